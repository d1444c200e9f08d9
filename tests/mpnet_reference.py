"""Hugging Face's MPNet run on a checkpoint: the reference tests/test_mpnet.py
compares model/mpnet.py with. It runs in its own venv (`make
mpnet-reference-venv`: TensorFlow, tf-keras and transformers 4.x, whose
TFMPNetModel is Hugging Face's TensorFlow port of the PyTorch model), never
in the project's, and imports nothing of this project.

    python tests/mpnet_reference.py CHECKPOINT_DIR TEXTS_JSON OUT_NPZ

writes the tokenizer's ids and attention mask (Hugging Face's Rust tokenizer
from tokenizer.json) and the encoder's last hidden states for the texts.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def main(checkpoint_dir: str, texts_path: str, out_path: str) -> None:
    import numpy as np
    import transformers
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer, MPNetConfig, TFMPNetModel
    from transformers.modeling_tf_pytorch_utils import load_pytorch_state_dict_in_tf2_model

    transformers.logging.set_verbosity_error()
    with open(texts_path, encoding="utf-8") as f:
        texts = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    model = TFMPNetModel(MPNetConfig.from_pretrained(checkpoint_dir))
    model.build_in_name_scope()
    # from_pretrained() would do this too, but 4.57 hands it a safe_open
    # handle it then iterates, which safetensors does not support: pass the
    # tensors as a dict instead (the same function, the same name mapping).
    _, info = load_pytorch_state_dict_in_tf2_model(
        model, load_file(os.path.join(checkpoint_dir, "model.safetensors")), tf_inputs=False,
        allow_missing_keys=False, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise SystemExit(f"reference: weights not loaded: {info}")
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=128,
                        return_tensors="np")
    hidden = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                   training=False).last_hidden_state.numpy()
    np.savez(out_path, input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
             hidden=hidden, transformers=transformers.__version__)


if __name__ == "__main__":
    main(*sys.argv[1:4])
