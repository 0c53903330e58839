"""Model code logged to MLflow by the demo, the tests and the benchmarks ("models from code": no
pickling by reference)."""

from pathlib import Path

EXAMPLES_DIR = Path(__file__).parent
PHRASEBOOK_MODEL = EXAMPLES_DIR / "phrasebook.py"
TRANSLATION_MODEL = EXAMPLES_DIR / "translation.py"
SLOW_ECHO_MODEL = EXAMPLES_DIR / "slow_echo.py"
