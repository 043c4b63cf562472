# Parameter counts behind docs/pretrained.md's memory table: mmgen models built on the meta device from HF config.json shapes.
import sys, json, tempfile, torch, dataclasses
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from mmgen.models.hf.config import read_model_fields
from mmgen.models import ModelConfig, build_model
cfgs = {"Qwen2.5-1.5B": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, sliding_window=131072, use_sliding_window=False),
        "Qwen2.5-7B": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-6, use_sliding_window=False),
        "Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rope_theta=5e5, rms_norm_eps=1e-5, rope_scaling={"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192})}
for name, c in cfgs.items():
    d = tempfile.mkdtemp(); json.dump(c, open(d+"/config.json","w"))
    f = read_model_fields(d); f["vocab_size"] += 8
    cfg = dataclasses.replace(ModelConfig(patch_dim=64), **f)
    with torch.device("meta"): m = build_model(cfg)
    P = sum(p.numel() for p in m.parameters())
    root = sum(p.numel() for n,p in m.named_parameters() if not n.startswith("layers."))
    blk = sum(p.numel() for p in m.layers[0].parameters())
    G=2**30
    print(name, f"P={P/1e9:.3f}B root={root/1e6:.0f}M block={blk/1e6:.1f}M", " ".join(f"N={n}: {16*P/n/G:.1f}+{4*root/G:.2f}+{2*4*blk/G:.2f}={16*P/n/G+4*root/G+8*blk/G:.1f}GiB" for n in (8,16,64)),
          " zero3 bf16:", " ".join(f"N={n}: {16*P/n/G:.1f}+{2*2*blk/G:.2f}" for n in (8,16,64)))
