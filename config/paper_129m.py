# The paper's 129M setting (../shared/DESIGN.md): 768 wide, 12 heads, 12 layers looped K=4 times,
# sequence 256, AdamW 3e-4 constant, weight decay 0.01, clip 1.0, dropout 0.1, bf16, batch 32.
# Data: as in config/paper_44m.py (WikiText-103, word level, in the paper).
dataset = "shakespeare_gpt2"
n_layer, n_head, n_embd, n_loops = 12, 12, 768, 4
block_size, batch_size = 256, 32
learning_rate, weight_decay, warmup_iters, lr_schedule = 3e-4, 0.01, 0, "constant"
grad_clip, dropout = 1.0, 0.1
max_iters, eval_interval, eval_iters = 20000, 500, 50
