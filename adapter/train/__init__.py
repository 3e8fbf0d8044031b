"""Training: DeepSpeed ZeRO-1 over the megatron-core model and schedule, with InternEvo's schedules."""
