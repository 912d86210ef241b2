# The default CPU run (the same values as train.py's defaults, spelled out): Shakespeare,
# characters, a 2-layer block looped 6 times; ~3.5 minutes on 2 cores. Prepare: python prepare.py
dataset = "shakespeare_char"
n_layer, n_head, n_embd, n_loops = 2, 4, 128, 6
block_size, batch_size = 128, 8
learning_rate, weight_decay, warmup_iters, lr_schedule = 6e-3, 0.0, 100, "constant"
grad_clip = 1.0
max_iters, eval_interval, eval_iters = 800, 100, 20
