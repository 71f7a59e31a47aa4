"""What a run needs from its machines, independent of the model: the device mesh and sharding
rules, checkpoints, preemption, multi-host start-up, CPU device splitting, the compilation cache
and metric writing."""
