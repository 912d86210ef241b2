# The paper's 44M setting, every value as in its official code (configs/44m): a block of 8
# layers (512 wide, 8 heads, SwiGLU 4x, pre-norm RMSNorm with eps 1e-6, tied embeddings, learned
# positions, no biases) looped K=4 times, PyTorch's default init; sequence 256, batch 64, AdamW
# at a constant 3e-4 (no warmup, betas 0.9 and 0.999), weight decay 0.01 on every parameter,
# gradient clip 1.0, dropout 0.1, seed 42; 4 epochs over every 257-token window at stride 128,
# each epoch shuffled. bf16 on a GPU that has it (dtype auto). 44M parameters at the paper's
# word-level vocabulary (20,000). The condition (readout, supervision, norm penalty) is a flag;
# the defaults, rmsnorm and per_loop, are the official per-step + norm config.
#
# The paper's data, WikiText-103 (raw) with its official splits, from the two files on disk:
#   python prepare.py --input=wiki.train.raw --val_input=wiki.valid.raw --tokenizer=word \
#       --name=wikitext103_word
#   python train.py config/paper_44m.py --dataset=wikitext103_word
# Offline, out of the box, it trains on Shakespeare with GPT-2 BPE (50,257 tokens: 59M
# parameters then):
#   python prepare.py --tokenizer=gpt2 && python train.py config/paper_44m.py
# A --max_iters flag overrides the epochs (a short run: --max_iters=300).
# Presets are Python and run as code, as in nanoGPT: use only presets you trust.
dataset = "shakespeare_gpt2"
# the model
n_layer = 8
n_head = 8
n_embd = 512
n_loops = 4
block_size = 256
init = "torch"
norm_eps = 1e-6
dropout = 0.1
bias = False
loop_norm = False
loop_norm_gain = True  # the official between-loop norm has a gain (off in these configs)
# the optimizer
batch_size = 64
gradient_accumulation_steps = 1  # global batch 64 on any number of GPUs (torchrun)
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
