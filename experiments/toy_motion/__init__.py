"""The paper's experiment at toy scale: every component trained on a synthetic moving-shapes world (README.md here)."""
