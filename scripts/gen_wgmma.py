"""Prints the wgmma specialisations of csrc/wgmma.cuh (the part after its
"Generated:" line): m64nNk16 with fp32 accumulators, bf16 and fp16, for the
shapes the Hopper prefill path uses: S = Q K^T over 128-key tiles (ss, N =
128) and O += P V over head dims 64 and 128 (rs). Their operand lists are too
long to write by hand: python3 scripts/gen_wgmma.py
"""

SS_SHAPES = (128,)
RS_SHAPES = (64, 128)
TYPES = (("__nv_bfloat16", "bf16"), ("__half", "f16"))

def regs(n):  # accumulator operand list for m64nN f32: N/2 registers as d[N/8][4]
    return ", ".join(f'"+f"(d[{i // 4}][{i % 4}])' for i in range(n // 2))

def placeholders(start, count):
    return ", ".join(f"%{i}" for i in range(start, start + count))

out = []
for n in SS_SHAPES:
    k = n // 2
    for t, ptx in TYPES:
        out.append(f'''template <>
__device__ __forceinline__ void wgmma_ss<{t}, {n}>(float (&d)[{n // 8}][4], uint64_t a, uint64_t b, int scale_d) {{
  JAXINFER_SM90A(
      "{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{k + 2}, 0;\\n"
      "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ptx}.{ptx} {{{placeholders(0, k)}}}, %{k}, %{k + 1}, p, 1, 1, 0, 0;\\n}}\\n"
      : {regs(n)}
      : "l"(a), "l"(b), "r"(scale_d));
}}
''')
for n in RS_SHAPES:
    k = n // 2
    for t, ptx in TYPES:
        out.append(f'''template <>
__device__ __forceinline__ void wgmma_rs<{t}, {n}>(float (&d)[{n // 8}][4], const uint32_t (&a)[4], uint64_t b) {{
  JAXINFER_SM90A(
      "{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{k + 5}, 0;\\n"
      "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ptx}.{ptx} {{{placeholders(0, k)}}}, {{%{k}, %{k + 1}, %{k + 2}, %{k + 3}}}, %{k + 4}, p, 1, 1, 1;\\n}}\\n"
      : {regs(n)}
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}}
''')
print("\n".join(out))
