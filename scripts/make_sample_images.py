"""Write the small sample images in examples/images/ (deterministic; rerun to regenerate)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
OUT = Path(__file__).resolve().parent.parent / "examples" / "images"


def shapes() -> Image.Image:
    """A red square, a green disc and a blue triangle on dark grey."""
    image = Image.new("RGB", (SIZE, SIZE), (40, 40, 40))
    draw = ImageDraw.Draw(image)
    draw.rectangle((6, 6, 26, 26), fill=(220, 40, 40))
    draw.ellipse((34, 8, 58, 32), fill=(40, 200, 60))
    draw.polygon([(12, 58), (32, 34), (52, 58)], fill=(50, 80, 230))
    return image


def stripes() -> Image.Image:
    """Vertical stripes on the left half, horizontal on the right: edges in both directions."""
    image = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for offset in range(0, SIZE // 2, 8):
        draw.rectangle((offset, 0, offset + 3, SIZE - 1), fill=(255, 255, 255))
        draw.rectangle((SIZE // 2, offset * 2, SIZE - 1, offset * 2 + 3), fill=(255, 200, 0))
    return image


def gradient() -> Image.Image:
    """A diagonal colour ramp with a checkerboard patch: smooth areas and sharp corners."""
    image = Image.new("RGB", (SIZE, SIZE))
    image.putdata([(4 * x, 4 * y, 255 - 2 * (x + y)) for y in range(SIZE) for x in range(SIZE)])
    draw = ImageDraw.Draw(image)
    for row in range(4):
        for column in range(4):
            if (row + column) % 2 == 0:
                x, y = 32 + 6 * column, 32 + 6 * row
                draw.rectangle((x, y, x + 5, y + 5), fill=(255, 255, 255))
    return image


def main() -> None:
    """Write shapes.png, stripes.png and gradient.png."""
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in (("shapes", shapes), ("stripes", stripes), ("gradient", gradient)):
        make().save(OUT / f"{name}.png", optimize=True)
        print(OUT / f"{name}.png")


if __name__ == "__main__":
    main()
