"""check_merged.py — check a merged HuggingFace folder against the unsharded reference,
independently of the merger that wrote it (torch, safetensors, transformers, peft only).

Checks: the same tensor names as the reference (every safetensors file, through the index
when sharded), the same shapes, the requested dtype for floating tensors (others keep
theirs), every tensor bit-for-bit equal to `reference.to(dtype)`; the index is consistent
(weight_map names exactly the stored tensors and existing files, total_size = tensor
bytes); config.json is present, names the requested dtype and otherwise matches the
reference; tokenizer files are present and encode like the reference's; the generation
config matches; processor files (preprocessor_config.json, chat_template.json,
video_preprocessor_config.json, processor_config.json) are byte-equal to the reference's.
Optional: --logits loads both folders with transformers and compares logits on a fixed
random input (a vision-language model: with its own class, on an image + text input built
with each folder's own image processor and tokenizer); --adapter compares MERGED/lora_adapter with the peft
reference adapter and the logits of both PeftModels.

Usage: check_merged.py --merged DIR --ref DIR [--dtype bf16|fp32|fp16] [--logits]
                       [--adapter REF_ADAPTER_DIR] [--state REF_STATE.safetensors]
                       [--tolerance T]
Exit 0 when everything matches; 1 with one line per difference otherwise.
"""
import argparse
import json
import os
import sys

import torch
from safetensors import safe_open

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONFIG_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
PROCESSOR_FILES = ("preprocessor_config.json", "chat_template.json", "video_preprocessor_config.json",
                   "processor_config.json")
IGNORED_CONFIG_FIELDS = {"dtype", "torch_dtype", "transformers_version"}


class Report:
    def __init__(self):
        self.problems = []

    def __call__(self, msg):
        self.problems.append(msg)


# ----------------------------------------------------------------------------- tensors

def read_safetensors_folder(folder, report, check_index=True):
    """{name: tensor} of a HF folder: model.safetensors, or every shard named by the index."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(index_path):
        if os.path.exists(single):
            report(f"{folder}: both model.safetensors and model.safetensors.index.json exist")
        with open(index_path) as f:
            index = json.load(f)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            report(f"{index_path}: no weight_map")
            return {}
        files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
        index, weight_map, files = None, None, ["model.safetensors"]
    else:
        report(f"{folder}: no model.safetensors and no model.safetensors.index.json")
        return {}

    tensors, where = {}, {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            report(f"{folder}: file {name} named by the index is missing")
            continue
        tensors.update(read_safetensors_file(path, report, where))
    if index is not None and check_index:
        for k, fname in where.items():
            if weight_map.get(k) != fname:
                report(f"index: {k} is stored in {fname} but weight_map says {weight_map.get(k)}")
        for k in sorted(set(weight_map) - set(where)):
            report(f"index: weight_map names {k} ({weight_map[k]}) but no file holds it")
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        meta_total = (index.get("metadata") or {}).get("total_size")
        if meta_total is None or int(meta_total) != total:
            report(f"index: metadata.total_size is {meta_total}, tensors hold {total} bytes")
        stray = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors") and f not in files)
        if stray:
            report(f"{folder}: safetensors files not named by the index: {stray}")
    return tensors


def read_safetensors_file(path, report, where=None, require_format=True):
    """{name: tensor} of one file. Model files must say format "pt" (transformers 4.x refuses
    them otherwise); peft reads adapters without looking."""
    out = {}
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if require_format and meta.get("format") != "pt":
                report(f"{path}: __metadata__.format is {meta.get('format')!r}, transformers 4.x wants 'pt'")
            for k in f.keys():
                if where is not None:
                    if k in where:
                        report(f"{k} is stored twice: in {where[k]} and {os.path.basename(path)}")
                    where[k] = os.path.basename(path)
                out[k] = f.get_tensor(k)
    except Exception as e:  # noqa: BLE001 - an unreadable file is a finding
        report(f"{path}: cannot read: {type(e).__name__}: {e}")
    return out


def bits_equal(a, b):
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def describe_diff(got, want):
    g, w = got.double(), want.double()
    diff = (g - w).abs()
    diff = torch.where(torch.isnan(g) & torch.isnan(w), torch.zeros_like(diff), diff)
    n_bad = int((~(got == want) & ~(torch.isnan(g) & torch.isnan(w))).sum()) if got.numel() else 0
    return f"{n_bad}/{got.numel()} elements differ, max |diff| {float(diff.max()) if diff.numel() else 0:.3g}"


def compare_tensors(merged, expected, dtype, tolerance, report, what="tensor"):
    for k in sorted(set(expected) - set(merged)):
        report(f"missing {what}: {k} {tuple(expected[k].shape)}")
    for k in sorted(set(merged) - set(expected)):
        report(f"extra {what}: {k} {tuple(merged[k].shape)}")
    n_ok = 0
    for k in sorted(set(merged) & set(expected)):
        got, ref = merged[k], expected[k]
        want_dtype = dtype if ref.is_floating_point() else ref.dtype
        if got.dtype != want_dtype:
            report(f"{k}: dtype {got.dtype}, expected {want_dtype}")
            continue
        if tuple(got.shape) != tuple(ref.shape):
            report(f"{k}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
            continue
        want = ref.to(want_dtype)
        if tolerance is None:
            if not bits_equal(got, want):
                report(f"{k}: values differ from reference.to({want_dtype}): {describe_diff(got, want)}")
                continue
        else:
            try:
                torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance, equal_nan=True)
            except AssertionError:
                report(f"{k}: values differ beyond tolerance {tolerance}: {describe_diff(got, want)}")
                continue
        n_ok += 1
    return n_ok


# ----------------------------------------------------------------------------- side files

def load_json(path, report):
    if not os.path.isfile(path):
        report(f"missing {path}")
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        report(f"{path}: not valid JSON ({e})")
        return None


def check_config(merged, ref, dtype, report):
    got = load_json(os.path.join(merged, "config.json"), report)
    want = load_json(os.path.join(ref, "config.json"), report)
    if got is None or want is None:
        return got
    field = "dtype" if "dtype" in got else "torch_dtype"
    if got.get(field) != CONFIG_DTYPE[dtype]:
        report(f"config.json: {field} is {got.get(field)!r}, expected {CONFIG_DTYPE[dtype]!r}")
    for k in sorted((set(got) | set(want)) - IGNORED_CONFIG_FIELDS):
        if got.get(k) != want.get(k):
            report(f"config.json: {k} is {got.get(k)!r}, reference has {want.get(k)!r}")
    return got


def check_side_files(merged, ref, report):
    for f in PROCESSOR_FILES:
        want = os.path.join(ref, f)
        if not os.path.isfile(want):
            continue
        got = os.path.join(merged, f)
        if not os.path.isfile(got):
            report(f"processor file missing: {f}")
        else:
            with open(got, "rb") as g, open(want, "rb") as w:
                if g.read() != w.read():
                    report(f"processor file {f} differs from the reference's")
    present = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(ref, f))]
    for f in present:
        if not os.path.isfile(os.path.join(merged, f)):
            report(f"tokenizer file missing: {f}")
    if present:
        from transformers import AutoTokenizer

        text = "hello world, the quick fox 42 <|im_end|> \u00fcn\u00efc\u00f6d\u00e9 \U0001F600"
        try:
            got, want = AutoTokenizer.from_pretrained(merged), AutoTokenizer.from_pretrained(ref)
            if got(text)["input_ids"] != want(text)["input_ids"]:
                report(f"tokenizer: merged encodes {got(text)['input_ids']}, reference {want(text)['input_ids']}")
            if want.chat_template and got.chat_template != want.chat_template:
                report("tokenizer: chat template differs from the reference's")
        except Exception as e:  # noqa: BLE001 - any failure to load is a finding
            report(f"tokenizer: cannot load from {merged}: {type(e).__name__}: {e}")
    gen_ref = os.path.join(ref, "generation_config.json")
    if os.path.isfile(gen_ref):
        got = load_json(os.path.join(merged, "generation_config.json"), report)
        want = load_json(gen_ref, report)
        if got is not None and want is not None:
            for k in sorted((set(got) | set(want)) - IGNORED_CONFIG_FIELDS):
                if got.get(k) != want.get(k):
                    report(f"generation_config.json: {k} is {got.get(k)!r}, reference has {want.get(k)!r}")


# ----------------------------------------------------------------------------- models

def is_vision_language(config):
    return isinstance(config.get("vision_config"), dict)


def auto_class(config):
    import transformers

    arch = (config.get("architectures") or [""])[0]
    if is_vision_language(config):
        return getattr(transformers, arch)  # the model's own class, as verl's AutoModelForVision2Seq picks it
    if "ForTokenClassification" in arch:
        return transformers.AutoModelForTokenClassification
    return transformers.AutoModelForCausalLM


def fixed_input(vocab):
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (2, 11), generator=gen)


def load_model(folder, cls, dtype, report, label):
    """from_pretrained in `dtype`; keys it had to invent or reshape are findings."""
    model, info = cls.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    for kind in ("missing_keys", "mismatched_keys"):
        if info.get(kind):
            report(f"{label}: transformers reports {kind} {sorted(info[kind])[:8]}")
    return model.eval()


def compare_logits(a, b, tolerance, report, label):
    if tolerance is None and a.dtype == b.dtype and bits_equal(a, b):
        return
    if tolerance is None:
        report(f"{label}: logits differ: {describe_diff(a, b)}")
        return
    try:
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)
    except AssertionError:
        report(f"{label}: logits differ beyond tolerance {tolerance}: {describe_diff(a, b)}")


def image_text_input(folder, config, report):
    """An image + text input as the folder's own processor files make it: a fixed random
    image through its image processor, a chat turn through its tokenizer and chat template,
    the image placeholder expanded to the image's tokens."""
    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    image = Image.fromarray((np.random.RandomState(7).rand(56, 84, 3) * 255).astype(np.uint8))
    ip = Qwen2VLImageProcessorPil.from_pretrained(folder)  # the PIL backend: no torchvision here
    tok = AutoTokenizer.from_pretrained(folder)
    with open(os.path.join(folder, "chat_template.json")) as f:
        template = json.load(f)["chat_template"]
    pix = ip(images=[image], return_tensors="pt")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "the quick brown fox"}]}]
    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    merge = config["vision_config"].get("spatial_merge_size", 2)
    n = int(pix["image_grid_thw"][0].prod()) // (merge * merge)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n, 1)
    ids = tok(text, return_tensors="pt")["input_ids"]
    image_id = config.get("image_token_id")
    if int((ids == image_id).sum()) != n:
        report(f"{folder}: the tokenizer gives {int((ids == image_id).sum())} image tokens (id {image_id}), expected {n}")
    return dict(input_ids=ids, pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"],
                mm_token_type_ids=(ids == image_id).int())


@torch.no_grad()
def check_logits(merged, ref, config, dtype, tolerance, report):
    cls = auto_class(config)
    m = load_model(merged, cls, dtype, report, "merged")
    r = load_model(ref, cls, dtype, report, "reference")
    if is_vision_language(config):
        got_in, want_in = image_text_input(merged, config, report), image_text_input(ref, config, report)
        for k in want_in:
            if not torch.equal(got_in[k], want_in[k]):
                report(f"image + text input: {k} from the merged folder's processor files differs from the reference's")
        got_in = {k: v.to(dtype) if v.is_floating_point() else v for k, v in got_in.items()}
        want_in = {k: v.to(dtype) if v.is_floating_point() else v for k, v in want_in.items()}
        compare_logits(m(**got_in).logits, r(**want_in).logits, tolerance, report, "model (image + text)")
        return
    ids = fixed_input(config["vocab_size"])
    compare_logits(m(input_ids=ids).logits, r(input_ids=ids).logits, tolerance, report, "model")


@torch.no_grad()
def check_adapter(merged, ref, ref_adapter, config, dtype, tolerance, report):
    import tempfile

    from peft import PeftModel
    from safetensors.torch import save_file

    got_dir = os.path.join(merged, "lora_adapter")
    got_cfg = load_json(os.path.join(got_dir, "adapter_config.json"), report)
    want_cfg = load_json(os.path.join(ref_adapter, "adapter_config.json"), report)
    if got_cfg is None or want_cfg is None:
        return
    for k in ("r", "lora_alpha", "peft_type", "task_type"):
        if got_cfg.get(k) != want_cfg.get(k):
            report(f"adapter_config.json: {k} is {got_cfg.get(k)!r}, reference has {want_cfg.get(k)!r}")
    if sorted(got_cfg.get("target_modules") or []) != sorted(want_cfg.get("target_modules") or []):
        report(f"adapter_config.json: target_modules {got_cfg.get('target_modules')}, "
               f"reference {want_cfg.get('target_modules')}")
    path = os.path.join(got_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        report(f"missing {path}")
        return
    got = read_safetensors_file(path, report, require_format=False)
    want = read_safetensors_file(os.path.join(ref_adapter, "adapter_model.safetensors"), report, require_format=False)
    compare_tensors(got, want, dtype, tolerance, report, what="adapter tensor")
    if report.problems:
        return  # logits only when everything else matches

    # Logits: each base with its adapter; the reference adapter cast to the same dtype first.
    cls = auto_class(config)
    ids = fixed_input(config["vocab_size"])
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in want.items()},
                  os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(want_cfg, f)
        m = PeftModel.from_pretrained(load_model(merged, cls, dtype, report, "merged base"), got_dir).eval()
        r = PeftModel.from_pretrained(load_model(ref, cls, dtype, report, "reference base"), tmp).eval()
        compare_logits(m(input_ids=ids).logits, r(input_ids=ids).logits, tolerance, report, "base + adapter")


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merged", required=True, help="folder written by the merger under test")
    ap.add_argument("--ref", required=True, help="reference HF folder (config, tokenizer, weights)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="requested output dtype (default bf16)")
    ap.add_argument("--logits", action="store_true", help="also compare logits with transformers")
    ap.add_argument("--adapter", help="reference peft adapter folder; checks MERGED/lora_adapter")
    ap.add_argument("--state", help="reference tensors from this safetensors file instead of REF's weights")
    ap.add_argument("--tolerance", type=float, default=None, help="atol=rtol for values and logits (default: exact)")
    a = ap.parse_args()

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)

    dtype = DTYPES[a.dtype]
    report = Report()
    if not os.path.isdir(a.merged):
        print(f"check_merged: {a.merged} is not a folder")
        return 1
    merged = read_safetensors_folder(a.merged, report)
    expected = (read_safetensors_file(a.state, Report()) if a.state
                else read_safetensors_folder(a.ref, Report(), check_index=False))
    n_ok = compare_tensors(merged, expected, dtype, a.tolerance, report)
    config = check_config(a.merged, a.ref, dtype, report)
    check_side_files(a.merged, a.ref, report)
    if config is not None:
        # Logits only when the folder is otherwise sound: a broken one says more above.
        try:
            if a.adapter:
                check_adapter(a.merged, a.ref, a.adapter, config, dtype, a.tolerance, report)
            if a.logits and not report.problems:
                check_logits(a.merged, a.ref, config, dtype, a.tolerance, report)
        except Exception as e:  # noqa: BLE001 - a folder transformers/peft cannot load is a finding
            report(f"loading with transformers/peft failed: {type(e).__name__}: {e}")

    if report.problems:
        print(f"check_merged: {a.merged} differs from {a.state or a.ref} ({len(report.problems)} problems):")
        for p in report.problems:
            print("  - " + p)
        return 1
    how = "equal to" if a.tolerance is None else f"within {a.tolerance:g} of"
    extra = (" + logits" if a.logits else "") + (" + adapter" if a.adapter else "")
    print(f"check_merged: OK: {n_ok} tensors {how} the reference as {a.dtype}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
