# The paper's 44M setting (../shared/DESIGN.md): 512 wide, 8 heads, 8 layers looped K=4 times,
# sequence 256, AdamW 3e-4 constant, weight decay 0.01, clip 1.0, dropout 0.1, bf16, batch 64.
# The paper trains on WikiText-103 with a word-level tokenizer. With the raw files on disk:
#   python prepare.py --input=wiki.train.raw,wiki.valid.raw --tokenizer=word --name=wikitext103_word
#   python train.py config/paper_44m.py --dataset=wikitext103_word
# Offline out of the box it uses Shakespeare with GPT-2 BPE (python prepare.py --tokenizer=gpt2).
dataset = "shakespeare_gpt2"
n_layer, n_head, n_embd, n_loops = 8, 8, 512, 4
block_size, batch_size = 256, 64
learning_rate, weight_decay, warmup_iters, lr_schedule = 3e-4, 0.01, 0, "constant"
grad_clip, dropout = 1.0, 0.1
max_iters, eval_interval, eval_iters = 20000, 500, 50
