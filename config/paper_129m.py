# The paper's 129M setting: a block of 12 layers (768 wide, 12 heads) looped K=4 times; batch
# 32; everything else as in config/paper_44m.py (sequence 256, AdamW at a constant 3e-4,
# weight decay 0.01, clip 1.0, dropout 0.1, bf16). 129M parameters at the paper's word-level
# vocabulary (20,000 words); the data as in config/paper_44m.py.
dataset = "shakespeare_gpt2"
n_layer = 12
n_head = 12
n_embd = 768
n_loops = 4
block_size = 256
batch_size = 32
gradient_accumulation_steps = 1  # global batch 32 on any number of GPUs (torchrun)
learning_rate = 3e-4
weight_decay = 0.01
warmup_iters = 0
lr_schedule = "constant"
grad_clip = 1.0
dropout = 0.1
max_iters = 20000
eval_interval = 500
eval_iters = 50
