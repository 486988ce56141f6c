"""Parameters and multiply-adds per image of every variant, for `quicknet info` without torch.

Generated from the model itself (`python -m quicknet.build.sizes` prints the table from
`quicknet.build.model`, which needs torch); tests/test_operating.py checks it against torch, so a changed
architecture fails the test until the table is regenerated."""

from __future__ import annotations

# variant: (parameters, multiply-adds of convolutions per 32x32 image)
SIZES: dict[str, tuple[int, int]] = {
    "quicknet": (3480330, 486637568),
    "quicknet-s": (888202, 125878272),
    "quicknet-xs": (231114, 33579008),
    "quicknet-res": (3480330, 486637568),
}


def table() -> str:
    return "\n".join(
        f"{name:<12} {params / 1e6:6.3f} M params  {macs / 1e9:6.3f} G MACs/image"
        for name, (params, macs) in SIZES.items()
    )


if __name__ == "__main__":
    from quicknet.build.model import VARIANTS, build_model, count_macs, count_params

    print("SIZES: dict[str, tuple[int, int]] = {")
    for name, cfg in VARIANTS.items():
        print(f'    "{name}": ({count_params(build_model(name))}, {count_macs(cfg)}),')
    print("}")
