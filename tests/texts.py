"""Small texts the training tests learn from: short enough to train on in seconds, repetitive enough to learn."""
from pathlib import Path

VERSE = """ROMEO:
But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.

JULIET:
O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name.

"""


def write_verse(folder: Path, repeats: int) -> Path:
    """folder/verse.txt holding VERSE `repeats` times (about 190 bytes each); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "verse.txt"
    path.write_text(VERSE * repeats)
    return path
