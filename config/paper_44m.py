# The paper's 44M setting: a block of 8 layers (512 wide, 8 heads, SwiGLU 4x, pre-norm RMSNorm,
# tied embeddings, learned positions) looped K=4 times; sequence 256, batch 64, AdamW at a
# constant 3e-4 (no warmup), weight decay 0.01, gradient clip 1.0, dropout 0.1, bf16.
# 44M parameters at the paper's word-level vocabulary (WikiText-103; prepare.py's word
# tokenizer keeps up to 20,000 words). With the raw files on disk:
#   python prepare.py --input=wiki.train.raw,wiki.valid.raw --tokenizer=word --name=wikitext103_word
#   python train.py config/paper_44m.py --dataset=wikitext103_word
# Offline out of the box it trains on Shakespeare with GPT-2 BPE:
#   python prepare.py --tokenizer=gpt2
# Presets are Python and run as code, as in nanoGPT: use only presets you trust.
dataset = "shakespeare_gpt2"
n_layer = 8
n_head = 8
n_embd = 512
n_loops = 4
block_size = 256
batch_size = 64
gradient_accumulation_steps = 1  # global batch 64 on any number of GPUs (torchrun)
learning_rate = 3e-4
weight_decay = 0.01
warmup_iters = 0
lr_schedule = "constant"
grad_clip = 1.0
dropout = 0.1
max_iters = 20000
eval_interval = 500
eval_iters = 50
