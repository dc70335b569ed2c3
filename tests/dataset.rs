//! The loader against small files written by the tests themselves.

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use genfeed::dataset::{
    load_sequences, read_items, Column, DataError, FieldType, InteractionReader, ItemReader, Items,
    Sequences, Value,
};
use proptest::prelude::*;

/// Writes `text` to `name` in a fresh temporary directory.
fn write(dir: &tempfile::TempDir, name: &str, text: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    fs::write(&path, text).unwrap();
    path
}

fn items_from(text: &[u8]) -> Result<Items, DataError> {
    Items::read(ItemReader::new(Cursor::new(text), "t.item")?)
}

fn seqs_from(text: &[u8], items: Option<&Items>) -> Result<Sequences, DataError> {
    Sequences::read(InteractionReader::new(Cursor::new(text), "t.inter")?, items)
}

fn item_err(text: &str) -> String {
    items_from(text.as_bytes()).unwrap_err().to_string()
}

fn inter_err(text: &str) -> String {
    seqs_from(text.as_bytes(), None).unwrap_err().to_string()
}

const ITEM_HEADER: &str = "item_id:token\ttitle:token_seq\tprice:float\temb:float_seq\n";

#[test]
fn reads_items_with_typed_values() {
    let items =
        items_from(format!("{ITEM_HEADER}a\tRed  shoes\t9.5\t1 -2.5e1\nb\t\t0\t\n").as_bytes())
            .unwrap();
    assert_eq!(
        items
            .columns
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>(),
        ["title:token_seq", "price:float", "emb:float_seq"]
    );
    assert_eq!(items.column("price"), Some(1));
    assert_eq!(items.column("item_id"), None);
    let a = &items.rows[0];
    assert_eq!((a.id.as_str(), a.line), ("a", 2));
    assert_eq!(
        a.values[0].tokens().unwrap().collect::<Vec<_>>(),
        ["Red", "shoes"]
    );
    assert_eq!(a.values[0].as_str(), Some("Red  shoes"));
    assert_eq!(a.values[1], Value::Float(9.5));
    assert_eq!(a.values[2], Value::FloatSeq(vec![1.0, -25.0]));
    let b = &items.rows[1];
    assert_eq!(b.values[0], Value::TokenSeq(String::new()));
    assert_eq!(b.values[2], Value::FloatSeq(vec![]));
}

#[test]
fn id_column_may_be_anywhere() {
    let items = items_from(b"title:token_seq\titem_id:token\nhello\tx\n").unwrap();
    assert_eq!(items.rows[0].id, "x");
    assert_eq!(items.rows[0].values, [Value::TokenSeq("hello".into())]);
    assert_eq!(
        items.columns,
        [Column {
            name: "title".into(),
            ty: FieldType::TokenSeq
        }]
    );
}

#[test]
fn crlf_bom_and_blank_lines() {
    let lf = items_from(b"item_id:token\tt:token_seq\na\tx y\n\nb\tz\n").unwrap();
    let crlf =
        items_from(b"\xEF\xBB\xBFitem_id:token\tt:token_seq\r\na\tx y\r\n\r\nb\tz\r\n").unwrap();
    assert_eq!(lf, crlf);
    assert_eq!(lf.rows[1].line, 4, "blank lines still count");
    assert_eq!(lf.rows[1].values[0], Value::TokenSeq("z".into()));
    // No terminator on the last line.
    assert_eq!(items_from(b"item_id:token\na").unwrap().rows[0].id, "a");
}

#[test]
fn io_error_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.item");
    let err = read_items(&path).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }));
    assert!(err
        .to_string()
        .starts_with(&format!("{}: ", path.display())));
}

#[test]
fn empty_file() {
    assert_eq!(
        item_err(""),
        "t.item: empty file, expected a typed header line (name:type ...)"
    );
    assert!(matches!(
        items_from(b"\n\r\n"),
        Err(DataError::Empty { .. })
    ));
}

#[test]
fn header_errors() {
    assert_eq!(
        item_err("item_id:token\ttitle\n"),
        "t.item:1: header column 2 (\"title\"): expected name:type, found no \":type\""
    );
    assert_eq!(
        item_err("item_id:token\tx:int\n"),
        "t.item:1: header column 2 (\"x:int\"): expected type token, token_seq, float or \
         float_seq, found \"int\""
    );
    assert_eq!(
        item_err("item_id:token\tx:float\tx:token\n"),
        "t.item:1: header column 3 (\"x:token\"): duplicate column name, first used by column 2"
    );
    assert_eq!(
        item_err("item_id:token\t:token\n"),
        "t.item:1: header column 2 (\":token\"): expected a column name before \":\""
    );
    let err = items_from(b"item_id:token\tt\xFF:token\n").unwrap_err();
    assert_eq!(err.to_string(), "t.item:1: column 2: invalid UTF-8");
}

#[test]
fn missing_or_mistyped_required_columns() {
    assert_eq!(
        item_err("id:token\ttitle:token_seq\n"),
        "t.item:1: missing required column item_id:token"
    );
    assert_eq!(
        item_err("\nitem_id:float\n"),
        "t.item:2: column 1 (item_id:float): expected type token"
    );
    assert_eq!(
        inter_err("user_id:token\titem_id:token\n"),
        "t.inter:1: missing required column timestamp:float"
    );
    assert_eq!(
        inter_err("item_id:token\ttimestamp:float\n"),
        "t.inter:1: missing required column user_id:token"
    );
    assert_eq!(
        inter_err("user_id:token\ttimestamp:float\n"),
        "t.inter:1: missing required column item_id:token"
    );
    assert_eq!(
        inter_err("user_id:token\titem_id:token\ttimestamp:token\n"),
        "t.inter:1: column 3 (timestamp:token): expected type float"
    );
}

#[test]
fn wrong_number_of_fields() {
    assert_eq!(
        item_err(&format!("{ITEM_HEADER}a\tt\t1\t2\nb\tt\t1\n")),
        "t.item:3: expected 4 tab-separated fields, found 3"
    );
    assert_eq!(
        inter_err("user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\tx\n"),
        "t.inter:2: expected 3 tab-separated fields, found 4"
    );
}

#[test]
fn bad_numbers_name_line_and_column() {
    let inter = "user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\n";
    assert_eq!(
        inter_err(&format!("{inter}u\ti\tabc\n")),
        "t.inter:3: column 3 (timestamp:float): expected a number, found \"abc\""
    );
    assert_eq!(
        inter_err(&format!("{inter}u\ti\tNaN\n")),
        "t.inter:3: column 3 (timestamp:float): expected a finite number, found \"NaN\""
    );
    assert_eq!(
        inter_err(&format!("{inter}u\ti\t-inf\n")),
        "t.inter:3: column 3 (timestamp:float): expected a finite number, found \"-inf\""
    );
    assert_eq!(
        inter_err(&format!("{inter}u\ti\t1e999\n")),
        "t.inter:3: column 3 (timestamp:float): expected a finite number, found \"1e999\""
    );
    assert_eq!(
        inter_err(&format!("{inter}u\ti\t\n")),
        "t.inter:3: column 3 (timestamp:float): expected a number, found \"\""
    );
    assert_eq!(
        item_err(&format!("{ITEM_HEADER}a\tt\t1\t0.5 x 2\n")),
        "t.item:2: column 4 (emb:float_seq): expected a number, found \"x\""
    );
    assert_eq!(
        item_err(&format!("{ITEM_HEADER}a\tt\t1\t0.5 1e39\n")),
        "t.item:2: column 4 (emb:float_seq): expected a finite number, found \"1e39\""
    );
}

#[test]
fn empty_ids_are_errors() {
    assert_eq!(
        item_err(&format!("{ITEM_HEADER}\tt\t1\t2\n")),
        "t.item:2: column 1 (item_id:token): expected a non-empty id, found \"\""
    );
    assert_eq!(
        inter_err("timestamp:float\titem_id:token\tuser_id:token\n1\ti\t\n"),
        "t.inter:2: column 3 (user_id:token): expected a non-empty id, found \"\""
    );
}

#[test]
fn invalid_utf8_names_the_column() {
    let err = items_from(b"item_id:token\ttitle:token_seq\na\tok\nb\tbad \xC3\x28\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "t.item:3: column 2 (title:token_seq): invalid UTF-8"
    );
}

#[test]
fn long_fields_are_shortened_in_messages() {
    let long = "é".repeat(500);
    let msg = inter_err(&format!(
        "user_id:token\titem_id:token\ttimestamp:float\nu\ti\t{long}\n"
    ));
    assert!(
        msg.ends_with(&format!("found \"{}...\"", "é".repeat(64))),
        "{msg}"
    );
}

#[test]
fn duplicate_item_names_both_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "d.item", b"item_id:token\na\nb\nc\nb\na\n");
    assert_eq!(
        read_items(&path).unwrap_err().to_string(),
        format!(
            "{}:5: duplicate item id \"b\", first defined at line 3",
            path.display()
        )
    );
}

#[test]
fn sequences_sort_by_time_and_keep_ties_in_file_order() {
    // Columns in a different order, plus an ignored extra column.
    let text = "item_id:token\trating:float\ttimestamp:float\tuser_id:token\n\
                i3\t5\t3\tu1\n\
                i1\t5\t1\tu1\n\
                i9\t5\t7\tu2\n\
                i2\t5\t2\tu1\n\
                i8\t5\t2\tu1\n\
                i7\t5\t-1\tu2\n";
    let s = seqs_from(text.as_bytes(), None).unwrap();
    assert_eq!(s.users, ["u1", "u2"]);
    // First-seen numbering.
    assert_eq!(s.items, ["i3", "i1", "i9", "i2", "i8", "i7"]);
    // u1: i1@1, then i2@2 and i8@2 in file order, then i3@3.
    assert_eq!(s.seqs, [vec![1, 3, 4, 0], vec![5, 2]]);
}

#[test]
fn sequences_follow_the_item_table() {
    let dir = tempfile::tempdir().unwrap();
    let items = write(&dir, "x.item", b"item_id:token\nz\ny\nx\nunused\n");
    let inter = write(
        &dir,
        "x.inter",
        b"user_id:token\titem_id:token\ttimestamp:float\nu\tx\t1\nu\tz\t2\nv\ty\t1\n",
    );
    let items = read_items(&items).unwrap();
    let s = load_sequences(&inter, Some(&items)).unwrap();
    assert_eq!(s.items, ["z", "y", "x", "unused"]);
    assert_eq!(s.seqs, [vec![2, 0], vec![1]]);

    let bad = write(
        &dir,
        "bad.inter",
        b"user_id:token\titem_id:token\ttimestamp:float\nu\tx\t1\nu\tnope\t2\n",
    );
    assert_eq!(
        load_sequences(&bad, Some(&items)).unwrap_err().to_string(),
        format!(
            "{}:3: column 2 (item_id:token): expected an item id from the item table, \
             found \"nope\"",
            bad.display()
        )
    );
}

/// Text for a field: any UTF-8 without tab, newline or carriage return
/// (a trailing `\r` is read as part of a CRLF terminator).
fn field() -> impl Strategy<Value = String> {
    "[^\t\n\r]{0,12}"
}

fn write_items(rows: &[(String, String, f64, Vec<f32>)]) -> String {
    let mut text = String::from("title:token_seq\titem_id:token\tprice:float\temb:float_seq\n");
    for (id, title, price, emb) in rows {
        let emb: Vec<String> = emb.iter().map(f32::to_string).collect();
        text += &format!("{title}\t{id}\t{price}\t{}\n", emb.join(" "));
    }
    text
}

proptest! {
    #[test]
    fn items_round_trip(
        rows in prop::collection::btree_map(
            "[^\t\n\r]{1,8}",
            (field(), -1e12f64..1e12, prop::collection::vec(-1e6f32..1e6, 0..4)),
            0..20,
        )
    ) {
        let rows: Vec<(String, String, f64, Vec<f32>)> = rows
            .into_iter()
            .map(|(id, (title, price, emb))| (id, title, price, emb))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "r.item", write_items(&rows).as_bytes());
        let items = read_items(&path).unwrap();
        prop_assert_eq!(items.rows.len(), rows.len());
        for (i, (row, (id, title, price, emb))) in items.rows.iter().zip(&rows).enumerate() {
            prop_assert_eq!(&row.id, id);
            prop_assert_eq!(row.line, i as u64 + 2);
            prop_assert_eq!(
                &row.values,
                &vec![
                    Value::TokenSeq(title.clone()),
                    Value::Float(*price),
                    Value::FloatSeq(emb.clone()),
                ]
            );
        }
    }

    #[test]
    fn any_bytes_give_ok_or_err(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        exhaust(&bytes);
    }

    #[test]
    fn bytes_after_a_valid_header_give_ok_or_err(
        body in prop::collection::vec(
            prop::sample::select(b"ab1.e-Nn\t\t\n\r \xFF\xC3".to_vec()),
            0..256,
        )
    ) {
        for header in [
            &b"item_id:token\tt:token_seq\tf:float\tv:float_seq\n"[..],
            b"user_id:token\titem_id:token\ttimestamp:float\n",
        ] {
            exhaust(&[header, &body].concat());
        }
    }
}

/// Runs every reader over `bytes` to the end; the test is that none panics.
fn exhaust(bytes: &[u8]) {
    if let Ok(items) = items_from(bytes) {
        let _ = seqs_from(bytes, Some(&items));
    }
    let _ = seqs_from(bytes, None);
    if let Ok(rdr) = ItemReader::new(Cursor::new(bytes), Path::new("p")) {
        rdr.for_each(drop);
    }
}
