# A tiny InternLM1 for CPU demos and tests: 4 layers of width 64 over a byte-level vocabulary (264), trained
# on the small dataset shipped in launch/data/tiny (paths are relative to the repository root).
# It runs on 2 processes: pipeline size 2 with 2 virtual stages each (the interleaved schedule).
JOB_NAME = "tiny"
model_type = "INTERNLM"

SEQ_LEN = 64
HIDDEN_SIZE = 64
NUM_ATTENTION_HEAD = 4
MLP_RATIO = 8 / 3
NUM_LAYER = 4
VOCAB_SIZE = 264  # byte-level ids 1-256 (adapter.data.prepare --tokenizer bytes), padded to a multiple of 8

ckpt = dict(
    enable_save_ckpt=True,
    save_ckpt_folder="local:runs/tiny/ckpt",
    checkpoint_every=20,
    async_upload=False,
    oss_snapshot_freq=10,
    auto_resume=False,
)

data = dict(
    seq_len=SEQ_LEN,
    num_worker=0,  # a tiny dataset: reading in the training process beats starting worker processes
    micro_num=4,  # micro-batches per optimizer step (a multiple of the pipeline size for interleaving)
    micro_bsz=2,  # sequences packed into one micro-batch row of micro_bsz * seq_len tokens
    valid_micro_num=2,
    valid_every=0,
    pack_sample_into_one=False,
    total_steps=40,
    skip_batches="",
    rampup_batch_size="",
    min_length=0,
    train_folder="launch/data/tiny",
    valid_folder=None,
)

grad_scaler = dict(
    fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000),
    growth_factor=2,
    backoff_factor=0.5,
    max_scale=2**24,
    hysteresis=2,
)

hybrid_zero_optimizer = dict(
    overlap_sync_grad=False,
    overlap_sync_param=False,
    reduce_bucket_size=512 * 1024 * 1024,
    clip_grad_norm=1.0,
)

loss = dict(label_smoothing=0)

adam = dict(lr=3e-3, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.01)

lr_scheduler = dict(total_steps=data["total_steps"], init_steps=0, warmup_ratio=0.1, eta_min=3e-4, last_epoch=-1)

beta2_scheduler = dict(init_beta2=adam["adam_beta2"], c=adam["adam_beta2_c"], cur_iter=-1)

model = dict(
    checkpoint=False,
    num_chunks=2,
    num_attention_heads=NUM_ATTENTION_HEAD,
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    mlp_ratio=MLP_RATIO,
    apply_post_layer_norm=False,
    dtype="torch.float32",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    use_flash_attn=False,
)

parallel = dict(
    zero1=-1,
    tensor=dict(size=1, mode="mtp"),
    pipeline=dict(size=2, interleaved_overlap=True),
)

cudnn_deterministic = False
cudnn_benchmark = False
