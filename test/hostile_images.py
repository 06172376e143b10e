"""Images built to attack a decoder, shared by the hostile-input, fuzz and ROS fuzz tests."""
import struct
import zlib


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed 68-byte PNG (valid CRCs) whose header declares width x height over a few bytes of pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))
