"""Codebook family: nearest-code search, torch.ops.vitk.codebook_argmin, at VQ tokenizers' shapes.

Peer: faiss exact search (what a retrieval user reaches for), the index built outside the timed
region: IndexFlatL2, or IndexFlatIP on L2-normalized codes for cosine (the queries are normalized
inside the timed region, as every other contender does), one index per group searched in turn for
a grouped codebook.
"""
import numpy as np
import torch

from harness import Case, Family, Peer, machine

CHECK_RTOL = 1e-4        # of ||z||^2 + ||e||^2: fp32 expansion error is ~1e-6 of it at D=256
CHECK_MAX_ROWS = 8192    # first and last halves when N is larger: tails are where tiling breaks


def _case(name, N, K, D, G=1, cosine=False):
    nk = 4.0 * N * K * G                                  # one fp32 N x K distance matrix
    outputs = 12.0 * N * G                                # int64 index + fp32 distance per vector
    return Case(
        name=name,
        shape=f"N={N} K={K} D={D}" + (f" G={G}" if G > 1 else "") + (" cos" if cosine else ""),
        params=dict(N=N, K=K, D=D, G=G, cosine=cosine),
        flops=2.0 * N * K * D * G,
        bytes=4.0 * (N * G * D + G * K * D) + outputs,
        # The reference materializes ||z||^2 + ||e||^2 broadcast to N x K, then baddbmm writes a second
        # N x K matrix (cosine: bmm, then 2 - 2 * it). Inductor's graph peaks the same (measured: both
        # add 512 MiB at FQGAN's 2 x 2048 x 16384). vitk packs the codebook once and keeps no N x K
        # state; faiss works through 4096 x 1024 fp32 distance blocks (per thread at most).
        est_bytes={"eager": 2 * nk, "compile": 2 * nk, "vitk": 4.0 * G * K * (D + 1) + outputs,
                   "peer": 16 * 2**20 * machine.cores() + outputs},
        est_why={"eager": "two N x K fp32 matrices", "compile": "two N x K fp32 matrices"},
    )


CASES = [
    _case("VQGAN-LC", N=2048, K=100_000, D=8),              # 8 images x 16x16 tokens
    _case("FQGAN", N=2048, K=16_384, D=8, G=2),
    _case("ViT-VQGAN", N=4096, K=8192, D=32, cosine=True),
    _case("generic", N=4096, K=1024, D=256),
    _case("large", N=65_536, K=100_000, D=8),
]


def make_inputs(case, gen):
    p = case.params
    G, N, K, D = p["G"], p["N"], p["K"], p["D"]
    z = torch.randn((N, G, D) if G > 1 else (N, D), generator=gen)
    cb = torch.randn((G, K, D) if G > 1 else (K, D), generator=gen)
    return {"z": z, "cb": cb}


def vitk(case, x):
    import vitkernels  # noqa: F401  (registers torch.ops.vitk)
    return torch.ops.vitk.codebook_argmin, (x["z"], x["cb"]), {"cosine": case.params["cosine"]}


def reference(case, x):
    from vitkernels.reference.codebook import codebook_argmin
    return codebook_argmin, (x["z"], x["cb"]), {"cosine": case.params["cosine"]}


# ---------------------------------------------------------------- peer: faiss
def _faiss_label():
    import faiss
    return f"faiss {faiss.__version__} IndexFlat"


def _faiss_setup(case, x):
    import faiss
    faiss.omp_set_num_threads(machine.cores())
    p = case.params
    G, N, K, D, cosine = p["G"], p["N"], p["K"], p["D"], p["cosine"]
    z = x["z"].numpy().reshape(N, G, D)
    indexes = []
    for g in range(G):
        codes = np.array(x["cb"].numpy().reshape(G, K, D)[g], dtype=np.float32, order="C")
        if cosine:
            faiss.normalize_L2(codes)
        index = faiss.IndexFlatIP(D) if cosine else faiss.IndexFlatL2(D)
        index.add(codes)
        indexes.append(index)

    def search():
        out = []
        for g, index in enumerate(indexes):
            q = z[:, g]
            if cosine or not q.flags.c_contiguous:
                q = np.ascontiguousarray(q) if not cosine else q.copy()   # normalize_L2 is in place
            if cosine:
                faiss.normalize_L2(q)
            out.append(index.search(q, 1))
        return out
    return search


PEER = Peer(name="faiss", label=_faiss_label, setup=_faiss_setup, devices=("cpu",))


# ---------------------------------------------------------------- correctness gate
def _exact(case, x, cache):
    """fp64 ground truth for the checked rows, computed once per case and kept in `cache`:
    rows, z [n, G, D], codes [G, K, D], min distance [n, G], its index [n, G]."""
    if "rows" not in cache:
        p = case.params
        G, N, K, D = p["G"], p["N"], p["K"], p["D"]
        half = CHECK_MAX_ROWS // 2
        rows = torch.arange(N) if N <= CHECK_MAX_ROWS else torch.cat([torch.arange(half), torch.arange(N - half, N)])
        z = x["z"].cpu().double().reshape(N, G, D)[rows]
        e = x["cb"].cpu().double().reshape(G, K, D)
        if p["cosine"]:
            z, e = torch.nn.functional.normalize(z, dim=-1), torch.nn.functional.normalize(e, dim=-1)
        e2 = (e * e).sum(-1)                                          # [G, K]
        chunk = max(1, (256 << 20) // (8 * K * G))                    # ~256 MB of fp64 distances at a time
        dmin, amin = [], []
        for zc in z.split(chunk):
            d = (zc * zc).sum(-1).T.unsqueeze(-1) + e2.unsqueeze(1) - 2 * torch.bmm(zc.transpose(0, 1), e.transpose(1, 2))
            m = d.min(-1)                                             # [G, c]
            dmin.append(m.values.T)
            amin.append(m.indices.T)
        cache.update(rows=rows, z=z, e=e, dmin=torch.cat(dmin).clamp_min(0), amin=torch.cat(amin))
    return cache["rows"], cache["z"], cache["e"], cache["dmin"], cache["amin"]


def check(case, x, contender, out, cache):
    """Every contender's indices must reach the exact minimum distance within tolerance (ties and
    near-ties may pick different codes); returned distances must be those of the returned codes."""
    p = case.params
    G, N = p["G"], p["N"]
    rows, z, e, dmin, amin = _exact(case, x, cache)
    if contender == "peer":
        idx = torch.from_numpy(np.stack([I[:, 0] for _, I in out], axis=-1)).reshape(N, G)
        dist = None
    else:
        idx, dist = out
        assert idx.shape == x["z"].shape[:-1], f"indices shape {tuple(idx.shape)}"
        idx, dist = idx.cpu().reshape(N, G), dist.cpu().reshape(N, G)
    idx = idx[rows].long()
    assert int(idx.min()) >= 0 and int(idx.max()) < p["K"], "index out of range"
    chosen = e[torch.arange(G), idx]                                       # [n, G, D]
    d_chosen = ((z - chosen) ** 2).sum(-1)
    scale = (z * z).sum(-1) + (chosen * chosen).sum(-1)
    excess = (d_chosen - dmin) / scale
    bad = int((excess > CHECK_RTOL).sum())
    assert bad == 0, f"{bad}/{idx.numel()} indices are not nearest (worst excess {excess.max():.2e} of scale)"
    facts = {"rows_checked": int(rows.numel()), "rtol": CHECK_RTOL,
             "worst_excess": float(excess.max()),
             "exact_index_agreement": float((idx == amin).double().mean())}
    if dist is not None:
        derr = ((dist[rows].double() - d_chosen).abs() / scale).max()
        assert derr <= CHECK_RTOL, f"returned distances are off by {derr:.2e} of scale"
        facts["worst_distance_error"] = float(derr)
    return facts


FAMILY = Family("codebook", CASES, make_inputs, vitk=vitk, reference=reference, check=check, peer=PEER)
test_codebook = FAMILY.pytest_function()
