"""Image-pin checks: does a version's requirements.txt pin packages at other versions than the
serving image has?"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class RequirementCheck:
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def check_requirements(requirements: tuple[str, ...], image_pins: Mapping[str, str]) -> RequirementCheck:
    """Compare a version's `name==x` pins with the serving image's; unknown packages are not judged."""
    check = RequirementCheck()
    for line in requirements:
        spec = line.split(";")[0].strip()
        if "==" not in spec:
            continue
        pkg, _, wanted = spec.partition("==")
        pkg = pkg.split("[")[0].strip().lower().replace("_", "-")
        have = image_pins.get(pkg)
        if have is not None and have != wanted.strip():
            check.mismatches.append(f"{pkg}=={wanted.strip()} (image has {have})")
    return check
