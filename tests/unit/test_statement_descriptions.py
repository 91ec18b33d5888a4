"""What pgherd keeps of a prepared statement's description to tell preparations apart."""

import struct

from workers import prepared, proto


def row_description(columns) -> bytearray:
    body = struct.pack("!H", len(columns))
    for name, table, type_oid, typmod in columns:
        body += name + b"\0" + struct.pack("!IhIhih", table, 1, type_oid, -1, typmod, 0)
    return bytearray(proto.message(b"T", body))


def test_a_table_made_again_with_the_same_columns_describes_the_same():
    before = prepared._row_types(row_description([(b"id", 16384, 25, -1), (b"n", 16384, 23, -1)]))
    after = prepared._row_types(row_description([(b"id", 16999, 25, -1), (b"n", 16999, 23, -1)]))
    assert before == after


def test_another_type_name_or_modifier_describes_otherwise():
    base = prepared._row_types(row_description([(b"n", 1, 23, -1)]))
    assert base != prepared._row_types(row_description([(b"n", 1, 25, -1)]))
    assert base != prepared._row_types(row_description([(b"m", 1, 23, -1)]))
    assert base != prepared._row_types(row_description([(b"n", 1, 23, 8)]))
