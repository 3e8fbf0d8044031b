"""Parallel layout and process-level runtime (distributed init, DeepSpeed mpu, CPU support)."""
