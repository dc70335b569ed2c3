//! The contract seen from outside: bytes in, records out, and every way the
//! bytes can be wrong.

use std::collections::BTreeMap;

use apache_avro::{writer::datum::GenericDatumWriter, Schema};
use genfeed::contract::{
    decode, encode, CatalogueEvent, DeadLetter, DecodeError, EncodeError, InputPosition,
    Interaction, InteractionKind, ItemChange, ItemRetire, ItemUpsert, Limits, RankedItem,
    ReadFormat, Recommendation, Record, SchemaIds, WireFormat, MAX_ALLOCATION_BYTES,
};
use proptest::prelude::*;
use serde::Serialize;

const CATALOGUE_ID: u32 = 11;
const UPSERT_ID: u32 = 12;
const RETIRE_ID: u32 = 13;
const INTERACTION_ID: u32 = 21;
const RECOMMENDATION_ID: u32 = 31;
const DEAD_LETTER_ID: u32 = 41;

/// Every record's current schema, under its own id.
fn current_ids() -> SchemaIds {
    let mut ids = SchemaIds::new();
    ids.insert::<CatalogueEvent>(CATALOGUE_ID, CatalogueEvent::schema().clone())
        .unwrap();
    ids.insert::<ItemUpsert>(UPSERT_ID, ItemUpsert::schema().clone())
        .unwrap();
    ids.insert::<ItemRetire>(RETIRE_ID, ItemRetire::schema().clone())
        .unwrap();
    ids.insert::<Interaction>(INTERACTION_ID, Interaction::schema().clone())
        .unwrap();
    ids.insert::<Recommendation>(RECOMMENDATION_ID, Recommendation::schema().clone())
        .unwrap();
    ids.insert::<DeadLetter>(DEAD_LETTER_ID, DeadLetter::schema().clone())
        .unwrap();
    ids
}

/// Writes `value` with an arbitrary schema, bypassing genfeed's validation:
/// this is how another producer (or an older one) writes.
fn write_with<T: Serialize>(schema: &Schema, value: &T) -> Vec<u8> {
    GenericDatumWriter::builder(schema)
        .build()
        .unwrap()
        .write_ser_to_vec(value)
        .unwrap()
}

fn confluent(schema_id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(datum);
    out
}

fn interaction() -> Interaction {
    Interaction {
        user_id: "u1".to_string(),
        item_id: "i1".to_string(),
        kind: InteractionKind::Purchase,
        timestamp: 1_700_000_000_000,
    }
}

fn upsert() -> ItemUpsert {
    ItemUpsert {
        item_id: "sku-1".to_string(),
        title: Some("Red kettle".to_string()),
        description: None,
        brand: Some("Acme".to_string()),
        categories: vec!["kitchen".to_string(), "kettles".to_string()],
        attributes: BTreeMap::from([("colour".to_string(), "red".to_string())]),
        embedding: Some(vec![0.25, -1.0, 3.5]),
    }
}

fn recommendation() -> Recommendation {
    Recommendation {
        user_id: "u1".to_string(),
        items: vec![
            RankedItem {
                item_id: "a".to_string(),
                sid: vec![12, 48, 7, 0],
                score: -0.5,
            },
            RankedItem {
                item_id: "b".to_string(),
                sid: vec![12, 48, 9, 1],
                score: -1.25,
            },
        ],
        model_version: "m-3".to_string(),
        tokenizer_version: "t-1".to_string(),
        generated_at: 1_700_000_000_123,
        trigger: InputPosition {
            topic: "interactions".to_string(),
            partition: 3,
            offset: 99,
        },
    }
}

fn dead_letter() -> DeadLetter {
    DeadLetter {
        source_topic: "t".to_string(),
        partition: 1,
        offset: 2,
        reason: "r".to_string(),
        raw: vec![0xde, 0xad, 0xbe],
        failed_at: 3,
    }
}

/// One valid Plain message per record type, with the record's name and a
/// decoder for it.
type Decoder = fn(&[u8], ReadFormat<'_>) -> Result<(), DecodeError>;

fn decoder<T: Record>() -> Decoder {
    |bytes, format| decode::<T>(bytes, format).map(drop)
}

fn samples() -> Vec<(&'static str, u32, Vec<u8>, Decoder)> {
    let event = CatalogueEvent {
        change: ItemChange::Upsert(upsert()),
    };
    vec![
        (
            CatalogueEvent::NAME,
            CATALOGUE_ID,
            encode(&event, WireFormat::Plain).unwrap(),
            decoder::<CatalogueEvent>(),
        ),
        (
            ItemUpsert::NAME,
            UPSERT_ID,
            encode(&upsert(), WireFormat::Plain).unwrap(),
            decoder::<ItemUpsert>(),
        ),
        (
            ItemRetire::NAME,
            RETIRE_ID,
            encode(
                &ItemRetire {
                    item_id: "x".into(),
                    reason: "gone".into(),
                },
                WireFormat::Plain,
            )
            .unwrap(),
            decoder::<ItemRetire>(),
        ),
        (
            Interaction::NAME,
            INTERACTION_ID,
            encode(&interaction(), WireFormat::Plain).unwrap(),
            decoder::<Interaction>(),
        ),
        (
            Recommendation::NAME,
            RECOMMENDATION_ID,
            encode(&recommendation(), WireFormat::Plain).unwrap(),
            decoder::<Recommendation>(),
        ),
        (
            DeadLetter::NAME,
            DEAD_LETTER_ID,
            encode(&dead_letter(), WireFormat::Plain).unwrap(),
            decoder::<DeadLetter>(),
        ),
    ]
}

// ---------------------------------------------------------------------------
// The bytes follow the Avro specification, so any implementation reads them.

/// Derived by hand from the spec: strings are a zigzag varint length then
/// UTF-8; ints and longs are zigzag varints; an enum is its symbol index; a
/// timestamp-millis is a long; the Confluent header is 0 then a big-endian id.
#[test]
fn interaction_bytes_follow_the_avro_spec() {
    let click = Interaction {
        user_id: "u".to_string(),
        item_id: "ab".to_string(),
        kind: InteractionKind::Click, // symbol index 1
        timestamp: -2,                // zigzag 3
    };
    let plain = [2, b'u', 4, b'a', b'b', 2, 3];
    assert_eq!(encode(&click, WireFormat::Plain).unwrap(), plain);
    let framed = encode(
        &click,
        WireFormat::Confluent {
            schema_id: 0x0102_0304,
        },
    )
    .unwrap();
    assert_eq!(framed[..5], [0, 1, 2, 3, 4]);
    assert_eq!(framed[5..], plain);
}

/// `raw` must be Avro `bytes` (length then bytes), not an array of ints.
#[test]
fn dead_letter_raw_is_avro_bytes() {
    let plain = [2, b't', 2, 4, 2, b'r', 6, 0xde, 0xad, 0xbe, 6];
    assert_eq!(encode(&dead_letter(), WireFormat::Plain).unwrap(), plain);
}

/// On the catalogue topic the union branch index comes first, so a plain
/// message says which change it carries.
#[test]
fn catalogue_events_lead_with_their_branch() {
    let upsert = CatalogueEvent {
        change: ItemChange::Upsert(upsert()),
    };
    let retire = CatalogueEvent {
        change: ItemChange::Retire(ItemRetire {
            item_id: "x".into(),
            reason: "gone".into(),
        }),
    };
    assert_eq!(encode(&upsert, WireFormat::Plain).unwrap()[0], 0);
    assert_eq!(encode(&retire, WireFormat::Plain).unwrap()[0], 2);
}

/// Optional fields are `["null", T]` unions: branch 0 is null, branch 1 the value.
#[test]
fn absent_optionals_encode_as_the_null_branch() {
    let bare = ItemUpsert {
        item_id: "i".to_string(),
        ..ItemUpsert::default()
    };
    // item_id, then title, description, brand: null (0); categories, attributes:
    // empty block (0); embedding: null (0).
    assert_eq!(
        encode(&bare, WireFormat::Plain).unwrap(),
        [2, b'i', 0, 0, 0, 0, 0, 0]
    );
}

// ---------------------------------------------------------------------------
// Round trips.

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

fn id() -> impl Strategy<Value = String> {
    "\\PC{1,12}"
}

fn float() -> impl Strategy<Value = f32> {
    use proptest::num::f32::*;
    POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO | INFINITE
}

fn upserts() -> impl Strategy<Value = ItemUpsert> {
    (
        id(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::collection::vec(text(), 0..4),
        proptest::collection::btree_map(text(), text(), 0..4),
        proptest::option::of(proptest::collection::vec(float(), 0..40)),
    )
        .prop_map(
            |(item_id, title, description, brand, categories, attributes, embedding)| ItemUpsert {
                item_id,
                title,
                description,
                brand,
                categories,
                attributes,
                embedding,
            },
        )
}

fn retires() -> impl Strategy<Value = ItemRetire> {
    (id(), text()).prop_map(|(item_id, reason)| ItemRetire { item_id, reason })
}

fn events() -> impl Strategy<Value = CatalogueEvent> {
    prop_oneof![
        upserts().prop_map(ItemChange::Upsert),
        retires().prop_map(ItemChange::Retire)
    ]
    .prop_map(|change| CatalogueEvent { change })
}

fn kinds() -> impl Strategy<Value = InteractionKind> {
    use InteractionKind::*;
    prop_oneof![
        Just(View),
        Just(Click),
        Just(AddToCart),
        Just(Purchase),
        Just(Rating),
        Just(Other)
    ]
}

fn interactions() -> impl Strategy<Value = Interaction> {
    (id(), id(), kinds(), any::<i64>()).prop_map(|(user_id, item_id, kind, timestamp)| {
        Interaction {
            user_id,
            item_id,
            kind,
            timestamp,
        }
    })
}

fn recommendations() -> impl Strategy<Value = Recommendation> {
    let item = (id(), proptest::collection::vec(any::<u16>(), 1..8), float()).prop_map(
        |(item_id, sid, score)| RankedItem {
            item_id,
            sid,
            score,
        },
    );
    let trigger =
        (text(), any::<i32>(), any::<i64>()).prop_map(|(topic, partition, offset)| InputPosition {
            topic,
            partition,
            offset,
        });
    (
        id(),
        proptest::collection::vec(item, 0..10),
        text(),
        text(),
        any::<i64>(),
        trigger,
    )
        .prop_map(
            |(user_id, items, model_version, tokenizer_version, generated_at, trigger)| {
                Recommendation {
                    user_id,
                    items,
                    model_version,
                    tokenizer_version,
                    generated_at,
                    trigger,
                }
            },
        )
}

fn dead_letters() -> impl Strategy<Value = DeadLetter> {
    (
        text(),
        any::<i32>(),
        any::<i64>(),
        text(),
        proptest::collection::vec(any::<u8>(), 0..64),
        any::<i64>(),
    )
        .prop_map(
            |(source_topic, partition, offset, reason, raw, failed_at)| DeadLetter {
                source_topic,
                partition,
                offset,
                reason,
                raw,
                failed_at,
            },
        )
}

/// Encodes in both formats, decodes, and checks equality; then checks that
/// every strict prefix of both messages fails with the precise error.
fn round_trip<T: Record + PartialEq + std::fmt::Debug>(value: &T, schema_id: u32) {
    let ids = current_ids();
    let plain = encode(value, WireFormat::Plain).unwrap();
    assert_eq!(&decode::<T>(&plain, ReadFormat::Plain).unwrap(), value);
    let framed = encode(value, WireFormat::Confluent { schema_id }).unwrap();
    assert_eq!(framed[5..], plain);
    assert_eq!(
        &decode::<T>(&framed, ReadFormat::Confluent(&ids)).unwrap(),
        value
    );

    for cut in 1..plain.len() {
        assert_eq!(
            decode::<T>(&plain[..cut], ReadFormat::Plain),
            Err(DecodeError::UnexpectedEnd { record: T::NAME }),
            "plain cut at {cut}"
        );
    }
    for cut in 1..framed.len() {
        let expected = if cut < 5 {
            DecodeError::Truncated {
                needed: 5,
                got: cut,
            }
        } else {
            DecodeError::UnexpectedEnd { record: T::NAME }
        };
        assert_eq!(
            decode::<T>(&framed[..cut], ReadFormat::Confluent(&ids)),
            Err(expected),
            "framed cut at {cut}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn catalogue_events_round_trip(event in events()) {
        round_trip(&event, CATALOGUE_ID);
    }

    #[test]
    fn upserts_round_trip(upsert in upserts()) {
        round_trip(&upsert, UPSERT_ID);
    }

    #[test]
    fn retires_round_trip(retire in retires()) {
        round_trip(&retire, RETIRE_ID);
    }

    #[test]
    fn interactions_round_trip(interaction in interactions()) {
        round_trip(&interaction, INTERACTION_ID);
    }

    #[test]
    fn recommendations_round_trip(rec in recommendations()) {
        round_trip(&rec, RECOMMENDATION_ID);
    }

    #[test]
    fn dead_letters_round_trip(letter in dead_letters()) {
        round_trip(&letter, DEAD_LETTER_ID);
    }
}

// ---------------------------------------------------------------------------
// Garbage.

/// Decodes `bytes` as `T` in `format`; if that succeeds (random bytes can be
/// a valid datum by chance), the value must survive a round trip unchanged.
fn garbage_is_rejected_or_genuine<T: Record>(bytes: &[u8], format: ReadFormat<'_>) {
    if let Ok(value) = decode::<T>(bytes, format) {
        let again = encode(&value, WireFormat::Plain).unwrap();
        let value: T = decode(&again, ReadFormat::Plain).unwrap();
        assert_eq!(encode(&value, WireFormat::Plain).unwrap(), again);
    }
}

fn all_records_on(bytes: &[u8], format: ReadFormat<'_>) {
    garbage_is_rejected_or_genuine::<CatalogueEvent>(bytes, format);
    garbage_is_rejected_or_genuine::<ItemUpsert>(bytes, format);
    garbage_is_rejected_or_genuine::<ItemRetire>(bytes, format);
    garbage_is_rejected_or_genuine::<Interaction>(bytes, format);
    garbage_is_rejected_or_genuine::<Recommendation>(bytes, format);
    garbage_is_rejected_or_genuine::<DeadLetter>(bytes, format);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Arbitrary bytes never panic or abort, whatever record is expected.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
        all_records_on(&bytes, ReadFormat::Plain);
    }

    /// The same, behind a valid Confluent header for each known id, so that
    /// the bytes reach schema resolution too.
    #[test]
    fn random_datums_behind_known_ids_never_panic(
        id in prop::sample::select(vec![CATALOGUE_ID, UPSERT_ID, RETIRE_ID, INTERACTION_ID, RECOMMENDATION_ID, DEAD_LETTER_ID]),
        datum in proptest::collection::vec(any::<u8>(), 0..96),
    ) {
        let ids = current_ids();
        all_records_on(&confluent(id, &datum), ReadFormat::Confluent(&ids));
    }

    /// Valid messages with a few bytes flipped: closer to real corruption
    /// than uniform noise, and much more likely to get deep into a datum.
    #[test]
    fn corrupted_messages_never_panic(
        pick in 0..6usize,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let (_, _, mut bytes, _) = samples().swap_remove(pick);
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        all_records_on(&bytes, ReadFormat::Plain);
    }
}

/// A length prefix of 100 MiB is refused before anything is allocated.
#[test]
fn huge_length_prefixes_are_refused_under_the_cap() {
    let len: i64 = 100 * 1024 * 1024;
    let mut zigzag = (len << 1) as u64;
    let mut bytes = Vec::new();
    while zigzag >= 0x80 {
        bytes.push((zigzag as u8) | 0x80);
        zigzag >>= 7;
    }
    bytes.push(zigzag as u8);
    bytes.extend_from_slice(b"abc");
    assert_eq!(
        decode::<ItemRetire>(&bytes, ReadFormat::Plain),
        Err(DecodeError::TooLarge {
            record: ItemRetire::NAME,
            desired: Some(len as usize),
            maximum: MAX_ALLOCATION_BYTES,
        })
    );
    // The cap is the one apache-avro enforces process-wide.
    assert_eq!(
        apache_avro::util::max_allocation_bytes(usize::MAX),
        MAX_ALLOCATION_BYTES
    );
}

/// A long array block count is refused as well (arrays reserve up front).
#[test]
fn huge_array_counts_are_refused() {
    // Recommendation: user_id "u", then an items block claiming 2^40 records.
    let mut bytes = vec![2, b'u'];
    let mut zigzag: u64 = 1 << 41;
    while zigzag >= 0x80 {
        bytes.push((zigzag as u8) | 0x80);
        zigzag >>= 7;
    }
    bytes.push(zigzag as u8);
    let err = decode::<Recommendation>(&bytes, ReadFormat::Plain).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::TooLarge {
                record: Recommendation::NAME,
                ..
            }
        ),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------
// Framing errors.

#[test]
fn empty_messages_are_empty_in_both_formats() {
    let ids = current_ids();
    let empty = DecodeError::Empty {
        record: Interaction::NAME,
    };
    assert_eq!(
        decode::<Interaction>(&[], ReadFormat::Plain),
        Err(empty.clone())
    );
    assert_eq!(
        decode::<Interaction>(&[], ReadFormat::Confluent(&ids)),
        Err(empty.clone())
    );
    // Only on the catalogue does it say how an item is retired.
    assert!(!empty.to_string().contains("ItemRetire"), "{empty}");
    let catalogue = decode::<CatalogueEvent>(&[], ReadFormat::Plain).unwrap_err();
    assert!(catalogue.to_string().contains("ItemRetire"), "{catalogue}");
}

/// A catalogue tombstone retires the item its key names, and a key that
/// names no item as the contract spells ids is an error naming the key.
#[test]
fn a_catalogue_tombstone_retires_the_item_its_key_names() {
    let limits = Limits {
        id_bytes: 8,
        text_bytes: 64,
    };
    let event = CatalogueEvent::tombstone(Some(b"item-1"), &limits).unwrap();
    match &event.change {
        ItemChange::Retire(r) => assert_eq!(r.item_id, "item-1"),
        other => panic!("{other:?}"),
    }
    // It is a retirement the contract could carry as an event.
    let bytes = encode(&event, WireFormat::Plain).unwrap();
    assert_eq!(
        decode::<CatalogueEvent>(&bytes, ReadFormat::Plain),
        Ok(event)
    );

    let keyless = CatalogueEvent::tombstone(None, &limits).unwrap_err();
    assert_eq!(keyless, DecodeError::KeylessTombstone);
    assert!(keyless.to_string().contains("no key"), "{keyless}");
    let bad = |key: &[u8]| CatalogueEvent::tombstone(Some(key), &limits).unwrap_err();
    for (key, field_error) in [
        (&b""[..], "invalid key: must not be empty"),
        (b"\0marker", "invalid key: must not start with a NUL byte"),
        (
            b"\xff\xfe",
            "invalid key: a tombstone's key names the item it retires, in UTF-8",
        ),
        (
            b"123456789",
            "field key is too large: 9 bytes, over the limit of 8",
        ),
    ] {
        let e = bad(key).to_string();
        assert!(e.starts_with(CatalogueEvent::NAME), "{e}");
        assert!(e.contains(field_error), "{key:?}: {e}");
    }
}

#[test]
fn a_bad_magic_byte_is_reported_as_such() {
    let ids = current_ids();
    let mut bytes = encode(
        &interaction(),
        WireFormat::Confluent {
            schema_id: INTERACTION_ID,
        },
    )
    .unwrap();
    bytes[0] = 1;
    assert_eq!(
        decode::<Interaction>(&bytes, ReadFormat::Confluent(&ids)),
        Err(DecodeError::BadMagic(1))
    );
    // A plain message read as Confluent: its first byte is a string length.
    let plain = encode(&interaction(), WireFormat::Plain).unwrap();
    assert_eq!(
        decode::<Interaction>(&plain, ReadFormat::Confluent(&ids)),
        Err(DecodeError::BadMagic(plain[0]))
    );
}

#[test]
fn a_confluent_message_read_as_plain_says_so() {
    let framed = encode(&interaction(), WireFormat::Confluent { schema_id: 77 }).unwrap();
    let err = decode::<Interaction>(&framed, ReadFormat::Plain).unwrap_err();
    assert_eq!(
        err,
        DecodeError::ConfluentFramed {
            record: Interaction::NAME,
            schema_id: 77
        }
    );
    assert!(err.to_string().contains("kafka.wire.format"), "{err}");
    // A zero byte then bytes that are no datum: the plain reader's own error.
    let mut garbage = framed[..5].to_vec();
    garbage.extend_from_slice(&[0xff; 3]);
    let err = decode::<Interaction>(&garbage, ReadFormat::Plain).unwrap_err();
    assert!(
        !matches!(err, DecodeError::ConfluentFramed { .. }),
        "{err:?}"
    );
}

#[test]
fn unknown_schema_ids_are_refused() {
    let ids = current_ids();
    let bytes = encode(&interaction(), WireFormat::Confluent { schema_id: 999 }).unwrap();
    let err = decode::<Interaction>(&bytes, ReadFormat::Confluent(&ids)).unwrap_err();
    assert_eq!(err, DecodeError::UnknownSchemaId(999));
    assert_eq!(err.to_string(), "unknown schema id 999");
}

#[test]
fn a_known_id_of_another_record_is_refused() {
    let ids = current_ids();
    let bytes = encode(
        &interaction(),
        WireFormat::Confluent {
            schema_id: INTERACTION_ID,
        },
    )
    .unwrap();
    assert_eq!(
        decode::<ItemUpsert>(&bytes, ReadFormat::Confluent(&ids)),
        Err(DecodeError::WrongRecord {
            record: ItemUpsert::NAME,
            schema_id: INTERACTION_ID,
            found: Interaction::NAME,
        })
    );
}

#[test]
fn trailing_bytes_are_an_error() {
    let ids = current_ids();
    let mut plain = encode(&interaction(), WireFormat::Plain).unwrap();
    plain.extend_from_slice(&[0, 0, 7]);
    let err = decode::<Interaction>(&plain, ReadFormat::Plain).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TrailingBytes {
            record: Interaction::NAME,
            count: 3
        }
    );
    assert!(err.to_string().contains("genfeed.v1.Interaction"), "{err}");

    let mut framed = encode(
        &interaction(),
        WireFormat::Confluent {
            schema_id: INTERACTION_ID,
        },
    )
    .unwrap();
    framed.push(0);
    assert_eq!(
        decode::<Interaction>(&framed, ReadFormat::Confluent(&ids)),
        Err(DecodeError::TrailingBytes {
            record: Interaction::NAME,
            count: 1
        })
    );
}

/// Plain bytes carry no schema, so a message of the wrong record can only be
/// caught by what it decodes to; every such pairing here fails, precisely.
#[test]
fn plain_bytes_of_another_record_are_refused() {
    let samples = samples();
    for (written, _, bytes, _) in &samples {
        for (expected, _, _, decode_as) in &samples {
            if written == expected {
                continue;
            }
            let err =
                decode_as(bytes, ReadFormat::Plain).expect_err(&format!("{written} as {expected}"));
            let shown = err.to_string();
            assert!(shown.contains(expected), "{written} as {expected}: {shown}");
        }
    }
}

#[test]
fn an_interaction_is_not_an_upsert() {
    let bytes = encode(&interaction(), WireFormat::Plain).unwrap();
    let err = decode::<ItemUpsert>(&bytes, ReadFormat::Plain).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Malformed {
                record: ItemUpsert::NAME,
                ..
            } | DecodeError::UnexpectedEnd {
                record: ItemUpsert::NAME
            } | DecodeError::TrailingBytes {
                record: ItemUpsert::NAME,
                ..
            }
        ),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------
// Validation.

#[test]
fn empty_identifiers_are_invalid_on_decode_and_refused_on_encode() {
    let mut anonymous = interaction();
    anonymous.user_id.clear();
    let bytes = write_with(Interaction::schema(), &anonymous);
    let err = decode::<Interaction>(&bytes, ReadFormat::Plain).unwrap_err();
    assert_eq!(
        err,
        DecodeError::Invalid {
            record: Interaction::NAME,
            field: "user_id",
            detail: "must not be empty".to_string(),
        }
    );
    assert_eq!(
        err.to_string(),
        "genfeed.v1.Interaction: invalid user_id: must not be empty"
    );
    assert!(matches!(
        encode(&anonymous, WireFormat::Plain),
        Err(EncodeError::Invalid {
            record: Interaction::NAME,
            field: "user_id",
            ..
        })
    ));

    let retire = CatalogueEvent {
        change: ItemChange::Retire(ItemRetire::default()),
    };
    let bytes = write_with(CatalogueEvent::schema(), &retire);
    assert!(matches!(
        decode::<CatalogueEvent>(&bytes, ReadFormat::Plain),
        Err(DecodeError::Invalid {
            field: "change.item_id",
            ..
        })
    ));
}

/// A negative or oversized SID token is not a token.
#[test]
fn sid_tokens_outside_u16_are_malformed() {
    #[derive(Serialize)]
    struct Item<'a> {
        item_id: &'a str,
        sid: Vec<i32>,
        score: f32,
    }
    #[derive(Serialize)]
    struct Rec<'a> {
        user_id: &'a str,
        items: Vec<Item<'a>>,
        model_version: &'a str,
        tokenizer_version: &'a str,
        generated_at: i64,
        trigger: InputPosition,
    }
    for token in [-1, 65_536] {
        let rec = Rec {
            user_id: "u",
            items: vec![Item {
                item_id: "a",
                sid: vec![1, token],
                score: 0.0,
            }],
            model_version: "m",
            tokenizer_version: "t",
            generated_at: 0,
            trigger: InputPosition {
                topic: "t".into(),
                partition: 0,
                offset: 0,
            },
        };
        let bytes = write_with(Recommendation::schema(), &rec);
        let err = decode::<Recommendation>(&bytes, ReadFormat::Plain).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::Malformed {
                    record: Recommendation::NAME,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Evolution.

/// The catalogue contract as a producer might still write it: `ItemUpsert`
/// before `brand`, `attributes` and `embedding` were added.
const CATALOGUE_V0: &str = r#"{
  "type": "record", "name": "CatalogueEvent", "namespace": "genfeed.v1",
  "fields": [{"name": "change", "type": [
    {"type": "record", "name": "ItemUpsert", "fields": [
      {"name": "item_id", "type": "string"},
      {"name": "title", "type": ["null", "string"], "default": null},
      {"name": "description", "type": ["null", "string"], "default": null},
      {"name": "categories", "type": {"type": "array", "items": "string"}, "default": []}
    ]},
    {"type": "record", "name": "ItemRetire", "fields": [
      {"name": "item_id", "type": "string"},
      {"name": "reason", "type": "string"}
    ]}
  ]}]
}"#;

#[derive(Serialize)]
struct UpsertV0 {
    item_id: String,
    title: Option<String>,
    description: Option<String>,
    categories: Vec<String>,
}

#[derive(Serialize)]
enum ChangeV0 {
    Upsert(UpsertV0),
}

#[derive(Serialize)]
struct EventV0 {
    change: ChangeV0,
}

#[test]
fn data_written_with_an_older_schema_reads_with_defaults() {
    let v0 = Schema::parse_str(CATALOGUE_V0).unwrap();
    let old = EventV0 {
        change: ChangeV0::Upsert(UpsertV0 {
            item_id: "sku-9".to_string(),
            title: Some("Teapot".to_string()),
            description: None,
            categories: vec!["kitchen".to_string()],
        }),
    };
    let bytes = confluent(5, &write_with(&v0, &old));

    let mut ids = SchemaIds::new();
    ids.insert::<CatalogueEvent>(5, v0).unwrap();
    let event = decode::<CatalogueEvent>(&bytes, ReadFormat::Confluent(&ids)).unwrap();
    let expected = ItemUpsert {
        item_id: "sku-9".to_string(),
        title: Some("Teapot".to_string()),
        description: None,
        brand: None,
        categories: vec!["kitchen".to_string()],
        attributes: BTreeMap::new(),
        embedding: None,
    };
    assert_eq!(
        event,
        CatalogueEvent {
            change: ItemChange::Upsert(expected)
        }
    );

    // Without resolution the same datum is not a current-schema datum.
    assert!(decode::<CatalogueEvent>(&bytes[5..], ReadFormat::Plain).is_err());
}

/// A newer producer added a field and an enum symbol this reader does not
/// know yet: the field is skipped and the symbol reads as the default.
#[test]
fn data_written_with_a_newer_schema_reads_too() {
    let v2 = Schema::parse_str(
        r#"{"type": "record", "name": "Interaction", "namespace": "genfeed.v1",
            "fields": [
              {"name": "user_id", "type": "string"},
              {"name": "item_id", "type": "string"},
              {"name": "kind", "type": {"type": "enum", "name": "InteractionKind",
                "symbols": ["VIEW", "CLICK", "ADD_TO_CART", "PURCHASE", "RATING", "OTHER", "SHARE"],
                "default": "OTHER"}},
              {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
              {"name": "session_id", "type": ["null", "string"], "default": null}
            ]}"#,
    )
    .unwrap();
    #[derive(Serialize)]
    #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
    enum KindV2 {
        Share,
    }
    #[derive(Serialize)]
    struct InteractionV2 {
        user_id: &'static str,
        item_id: &'static str,
        kind: KindV2,
        timestamp: i64,
        session_id: Option<&'static str>,
    }
    let new = InteractionV2 {
        user_id: "u1",
        item_id: "i1",
        kind: KindV2::Share,
        timestamp: 7,
        session_id: Some("s-1"),
    };
    let bytes = confluent(6, &write_with(&v2, &new));
    let mut ids = SchemaIds::new();
    ids.insert::<Interaction>(6, v2).unwrap();
    let read = decode::<Interaction>(&bytes, ReadFormat::Confluent(&ids)).unwrap();
    assert_eq!(
        read,
        Interaction {
            user_id: "u1".to_string(),
            item_id: "i1".to_string(),
            kind: InteractionKind::Other,
            timestamp: 7,
        }
    );
}

/// A writer whose retire branch lacks `reason` is only partially compatible
/// (its upserts still read), so it is accepted, and each retire it writes
/// fails alone, naming the missing field.
#[test]
fn a_field_the_writer_lacks_and_the_reader_needs_is_missing() {
    let writer = Schema::parse_str(
        r#"{"type": "record", "name": "CatalogueEvent", "namespace": "genfeed.v1",
            "fields": [{"name": "change", "type": [
              {"type": "record", "name": "ItemUpsert", "fields": [{"name": "item_id", "type": "string"}]},
              {"type": "record", "name": "ItemRetire", "fields": [{"name": "item_id", "type": "string"}]}
            ]}]}"#,
    )
    .unwrap();
    let mut ids = SchemaIds::new();
    ids.insert::<CatalogueEvent>(8, writer).unwrap();
    // Branch 1 (zigzag 2), item_id "x".
    let bytes = confluent(8, &[2, 2, b'x']);
    assert_eq!(
        decode::<CatalogueEvent>(&bytes, ReadFormat::Confluent(&ids)),
        Err(DecodeError::MissingField {
            record: CatalogueEvent::NAME,
            field: "reason".to_string()
        })
    );
    // Branch 0, item_id "y": an upsert with every new field defaulted.
    let upsert =
        decode::<CatalogueEvent>(&confluent(8, &[0, 2, b'y']), ReadFormat::Confluent(&ids))
            .unwrap();
    assert_eq!(
        upsert.change,
        ItemChange::Upsert(ItemUpsert {
            item_id: "y".to_string(),
            ..ItemUpsert::default()
        })
    );
}
