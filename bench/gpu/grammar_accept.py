"""Whether xgrammar accepts tokens faster from several threads (it would if accept_token
released the GIL): 64 matchers of the bench JSON schema, 40 steps, per thread count.

    PYTHONPATH=. python bench/gpu/grammar_accept.py
"""
import json, tempfile, time, os, sys, torch, statistics, threading
from concurrent.futures import ThreadPoolExecutor
from engine.builtin_models import make_model
from engine.tokenizer import Tokenizer
from engine.structured_output.manager import StructuredOutputManager
from engine.sampling_params import StructuredOutputsParams
import xgrammar as xgr
SCHEMA = {"type": "array", "minItems": 64, "items": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}}
path = make_model(os.path.join(tempfile.mkdtemp(), "m"), "llama-3-8b", with_weights=False)
tok = Tokenizer.from_pretrained(path)
vocab = json.load(open(path / "config.json"))["vocab_size"]
m = StructuredOutputManager(tok, vocab, "cpu")
so = StructuredOutputsParams(json=SCHEMA, backend="xgrammar")
compiled = m.compile(so)[1]
ms = [xgr.GrammarMatcher(compiled) for _ in range(64)]
bm = xgr.allocate_token_bitmask(64, vocab)
g = torch.Generator().manual_seed(0)
# a shared token sequence per matcher: argmax of masked random logits
seqs = [[] for _ in range(64)]
for step in range(40):
    logits = torch.randn(64, vocab, generator=g)
    for i, x in enumerate(ms): x.fill_next_token_bitmask(bm, i)
    xgr.apply_token_bitmask_inplace(logits, bm)
    t = logits.argmax(dim=-1).tolist()
    for i, x in enumerate(ms): assert x.accept_token(t[i]); seqs[i].append(t[i])
def run(par):
    ms2 = [xgr.GrammarMatcher(compiled) for _ in range(64)]
    pool = ThreadPoolExecutor(par)
    tt = []
    for step in range(40):
        toks = [s[step] for s in seqs]
        t0 = time.perf_counter()
        if par == 1:
            ok = [x.accept_token(tk) for x, tk in zip(ms2, toks)]
        else:
            n = (64 + par - 1) // par
            futs = [pool.submit(lambda a, b: [x.accept_token(tk) for x, tk in zip(a, b)], ms2[i:i+n], toks[i:i+n]) for i in range(0, 64, n)]
            ok = [v for f in futs for v in f.result()]
        tt.append(time.perf_counter() - t0); assert all(ok)
    return statistics.median(tt) * 1e3
for par in (1, 2, 4, 8, 1, 8):
    print("threads", par, "accept ms per step of 64:", round(run(par), 3), flush=True)
