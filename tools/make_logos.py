"""Draw the blocks' square catalog logos into chia_prefect/static/ (run once; needs Pillow)."""

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parent.parent / "chia_prefect" / "static"
SIZE = 256


def logo(name: str, background: str, accent: str, label: str) -> None:
    img = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle((0, 0, SIZE - 1, SIZE - 1), radius=40, fill=background)
    # A database drum: three stacked discs.
    left, right, top, height, rim = 64, 192, 42, 118, 30
    draw.rectangle((left, top + rim // 2, right, top + height), fill=accent)
    for y in (top + height, top + height * 2 // 3, top + height // 3):
        draw.ellipse((left, y - rim // 2, right, y + rim // 2), fill=accent, outline=background, width=5)
    draw.ellipse((left, top, right, top + rim), fill="white", outline=accent, width=5)
    font = ImageFont.load_default(size=44)
    width = draw.textlength(label, font=font)
    draw.text(((SIZE - width) / 2, 186), label, fill="white", font=font)
    img.save(OUT / f"{name}.png", optimize=True)


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    logo("sqlite-node", "#003b57", "#5fb0e0", "SQLite")
    logo("postgres-node", "#336791", "#a8c8e8", "Postgres")
