"""The main job: one rollout fleet feeding Stage 0 -> I -> II, then a sample (loop/pipeline.py)."""
