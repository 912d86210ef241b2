# The CPU demo: Shakespeare characters, a 2-layer block (128 wide, 4 heads) looped K=6 times,
# 800 steps of batch 8 x 128 characters at lr 6e-3: the blind spot in about 8 minutes on one core.
#   python prepare.py && python train.py config/cpu.py
dataset = "shakespeare_char"
n_layer = 2
n_head = 4
n_embd = 128
n_loops = 6
block_size = 128
batch_size = 8
gradient_accumulation_steps = 1
learning_rate = 6e-3
min_lr = 6e-4
warmup_iters = 100
weight_decay = 0.0
max_iters = 800
eval_interval = 100
eval_iters = 20
