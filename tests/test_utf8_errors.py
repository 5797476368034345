"""Text that is not UTF-8 is refused naming the file and the line, whatever reads it."""

import pytest

from kronlm.data.text import load_text
from kronlm.evaluation.harness import lambada_task


def test_utf8_errors_name_file_and_line(tmp_path):
    p = tmp_path / "a.csv"; p.write_bytes(b"text,x\nhello,1\nca\xd0\xd0fe,2\n")
    with pytest.raises(ValueError, match=r"a.csv: not UTF-8 text at line 3 \(byte 0xd0"):
        load_text(str(p), text_field="text")
    q = tmp_path / "l.jsonl"; q.write_bytes(b'{"text": "a b"}\n{"text": "\xd0x y"}\n')
    with pytest.raises(ValueError, match=r"l.jsonl: not UTF-8 text at line 2"):
        lambada_task(str(q))
