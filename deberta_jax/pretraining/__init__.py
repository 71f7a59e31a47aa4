"""RTD pre-training: the loop (`train`), the jitted step (`train_step`), masking and sampling,
the loss sums, the optimizer, the micro-batch planner and the analytic FLOP count."""
