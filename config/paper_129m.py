# The paper's 129M setting: a block of 12 layers (768 wide, 12 heads) looped K=4 times, batch
# 32; every other value as in config/paper_44m.py, which follows the official code (sequence
# 256, AdamW at a constant 3e-4 with betas 0.9 and 0.999, weight decay 0.01 on every parameter,
# clip 1.0, dropout 0.1, RMSNorm eps 1e-6, PyTorch's default init, seed 42, 4 epochs of windows
# at stride 128). The official snapshot has no 129M config: the sizes and batch are the paper's.
# 129M parameters at the paper's word-level vocabulary (20,000 words).
#
# The paper's data, WikiText-103 (raw) with its official splits, from the two files on disk:
#   python prepare.py --input=wiki.train.raw --val_input=wiki.valid.raw --tokenizer=word \
#       --name=wikitext103_word
#   python train.py config/paper_129m.py --dataset=wikitext103_word
# Offline, out of the box, it trains on Shakespeare with GPT-2 BPE (152M parameters then):
#   python prepare.py --tokenizer=gpt2 && python train.py config/paper_129m.py
# A --max_iters flag overrides the epochs.
dataset = "shakespeare_gpt2"
# the model
n_layer = 12
n_head = 12
n_embd = 768
n_loops = 4
block_size = 256
init = "torch"
norm_eps = 1e-6
dropout = 0.1
bias = False
loop_norm = False
loop_norm_gain = True
# the optimizer
batch_size = 32
gradient_accumulation_steps = 1  # global batch 32 on any number of GPUs (torchrun)
learning_rate = 3e-4
lr_schedule = "constant"
warmup_iters = 0
beta1 = 0.9
beta2 = 0.999
weight_decay = 0.01
weight_decay_on = "all"
grad_clip = 1.0
seed = 42
# the data order: 4 epochs of shuffled windows at stride 128
sampling = "epochs"
stride = 128
epochs = 4
eval_interval = 500
eval_iters = 50
