"""The tiny TRL SFT runs that tests/hf/test_trl.py and its torchrun worker compare (needs trl and datasets)."""
import datasets
import trl

from sga.models import tiny_random_model, tiny_tokenizer

# the tiny chat format with TRL's {% generation %} markers around the assistant's turns (assistant_only_loss)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}</s>{% endgeneration %}"
    "{% else %}{{ m['content'] }}</s>{% endif %}\n{% endfor %}"
)


def sft_config(tmp_path, **overrides):
    """Batch 2 x accumulation 2, three plain SGD steps: the weights after them depend on every micro-batch's loss and
    on how each is normalized (the micro-batches hold different label counts). float32: SFTConfig's default bf16=True
    is CPU bf16 autocast here, whose rounding differs between any two implementations (test_bf16_autocast below);
    SFTConfig's default gradient checkpointing stays on."""
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, bf16=False,
        learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        dataset_num_proc=None,
    )
    settings.update(overrides)
    return trl.SFTConfig(**settings)


def answer(i):
    return f" A{i} " + "xy" * (1 + i % 4)


def question(i):
    return f"Q{i}: who is {'ab' * (i % 3)}?"


DATASETS = {
    # language modeling: the loss is over every token
    "text": lambda i: {"text": question(i) + answer(i)},
    # prompt-completion: SFTTrainer's default for it is the completion-only loss
    "prompt_completion": lambda i: {"prompt": question(i), "completion": answer(i)},
    # conversational, with assistant_only_loss=True
    "assistant_only": lambda i: {
        "messages": [{"role": "user", "content": question(i)}, {"role": "assistant", "content": answer(i)}]
    },
}


def tokenizer_for(kind):
    tok = tiny_tokenizer(chat_template=True)
    if kind == "assistant_only":
        tok.chat_template = CHAT_TEMPLATE
    return tok


def train(trainer_class, kind, tmp_path, *, peft_config=None, config=None, **trainer_kwargs):
    tok = tokenizer_for(kind)
    dataset = datasets.Dataset.from_list([DATASETS[kind](i) for i in range(12)])
    config = config or {}
    if kind == "assistant_only":
        config = {"assistant_only_loss": True, **config}
    trainer = trainer_class(
        model=tiny_random_model("llama", tok), args=sft_config(tmp_path, **config), train_dataset=dataset,
        processing_class=tok, peft_config=peft_config, **trainer_kwargs,
    )
    trainer.train()
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, weights, losses
