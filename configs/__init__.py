"""The ml_collections config files (stageA.py, stageB.py, prototypes.py, infer.py; common.py), installed with cgjax."""
