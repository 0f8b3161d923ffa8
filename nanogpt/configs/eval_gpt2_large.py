# evaluate the base gpt2-large on OpenWebText (data/openwebtext/prepare.py first)
# n_layer, n_head and n_embd come from the checkpoint
batch_size = 8
eval_iters = 500  # use more iterations to get good estimate
eval_only = True
wandb_log = False
init_from = "gpt2-large"
