//! Schema resolution that honours the names of union branches.
//!
//! The Avro specification resolves a writer's union branch to the reader's
//! branch *of the same name*. apache-avro 0.22 instead takes the first reader
//! branch the value fits. Because every field added to a record must have a
//! default, almost any record fits almost any other: an `ItemRetire
//! { item_id, reason }` fits `ItemUpsert` (`item_id` matches, the rest takes
//! defaults, `reason` is skipped as unknown), so through plain apache-avro
//! resolution every retire written with a registered schema would be read as
//! an upsert, and the item would never leave the index.
//!
//! So resolution here is two steps: apache-avro resolves the datum (it knows
//! defaults, promotions and enum symbols), then [`repair`] walks the writer's
//! value alongside and re-resolves every union whose named branch was picked
//! by shape rather than by name.
//!
//! Named types referenced by name (`Schema::Ref`) are left as apache-avro
//! resolved them; genfeed's schemas define each named type inline, once.

use apache_avro::{
    error::Details,
    schema::{Schema, UnionSchema},
    types::Value,
    AvroResult,
};

/// Resolves `written`, a datum of `writer`, to the `reader` schema.
pub(crate) fn resolve(written: Value, writer: &Schema, reader: &Schema) -> AvroResult<Value> {
    let resolved = written.clone().resolve(reader)?;
    repair(resolved, &written, writer, reader)
}

/// Fixes the union branches of `resolved` to follow names, not shapes.
fn repair(resolved: Value, written: &Value, writer: &Schema, reader: &Schema) -> AvroResult<Value> {
    match (writer, reader, written, resolved) {
        (Schema::Union(w), Schema::Union(r), Value::Union(wi, inner), Value::Union(ri, out)) => {
            match w.variants().get(*wi as usize) {
                Some(branch) => pick_branch(branch, r, inner, ri, *out),
                None => Ok(Value::Union(ri, out)),
            }
        }
        (branch, Schema::Union(r), inner, Value::Union(ri, out)) => {
            pick_branch(branch, r, inner, ri, *out)
        }
        (Schema::Record(w), Schema::Record(r), Value::Record(ins), Value::Record(outs)) => outs
            .into_iter()
            .map(|(name, out)| {
                let both = w.lookup.get(&name).zip(r.lookup.get(&name));
                let out = match both {
                    Some((&wi, &ri)) => {
                        repair(out, &ins[wi].1, &w.fields[wi].schema, &r.fields[ri].schema)?
                    }
                    None => out,
                };
                Ok((name, out))
            })
            .collect::<AvroResult<_>>()
            .map(Value::Record),
        (Schema::Array(w), Schema::Array(r), Value::Array(ins), Value::Array(outs)) => outs
            .into_iter()
            .zip(ins)
            .map(|(out, item)| repair(out, item, &w.items, &r.items))
            .collect::<AvroResult<_>>()
            .map(Value::Array),
        (Schema::Map(w), Schema::Map(r), Value::Map(ins), Value::Map(outs)) => outs
            .into_iter()
            .map(|(key, out)| match ins.get(&key) {
                Some(item) => Ok((key, repair(out, item, &w.types, &r.types)?)),
                None => Ok((key, out)),
            })
            .collect::<AvroResult<_>>()
            .map(Value::Map),
        (_, _, _, resolved) => Ok(resolved),
    }
}

/// Resolves the writer's union `branch` (holding `inner`) into the reader
/// union `reader`, where apache-avro picked branch `picked` (holding `out`).
fn pick_branch(
    branch: &Schema,
    reader: &UnionSchema,
    inner: &Value,
    picked: u32,
    out: Value,
) -> AvroResult<Value> {
    let Some(name) = branch.name().map(|n| n.fullname(None)) else {
        // Unnamed branches (null, string, array, ...) match by type, which
        // is what apache-avro did.
        return repair(out, inner, branch, &reader.variants()[picked as usize])
            .map(|out| Value::Union(picked, Box::new(out)));
    };
    let same_name = reader
        .variants()
        .iter()
        .position(|b| b.name().is_some_and(|n| n.fullname(None) == name));
    match same_name {
        Some(i) if i == picked as usize => repair(out, inner, branch, &reader.variants()[i])
            .map(|out| Value::Union(picked, Box::new(out))),
        Some(i) => resolve(inner.clone(), branch, &reader.variants()[i])
            .map(|out| Value::Union(i as u32, Box::new(out))),
        None => Err(Details::FindUnionVariant {
            schema: reader.clone(),
            value: inner.clone(),
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{CatalogueEvent, Record};

    /// The bug this module exists for: a retire must stay a retire.
    #[test]
    fn union_branches_resolve_by_name_not_by_shape() {
        let schema = CatalogueEvent::schema();
        let retire = Value::Record(vec![(
            "change".to_string(),
            Value::Union(
                1,
                Box::new(Value::Record(vec![
                    ("item_id".to_string(), Value::String("x".to_string())),
                    ("reason".to_string(), Value::String("gone".to_string())),
                ])),
            ),
        )]);
        // apache-avro alone picks the first branch that fits: ItemUpsert. If
        // this starts failing, apache-avro has fixed it and this module can go.
        let by_shape = retire.clone().resolve(schema).unwrap();
        let Value::Record(fields) = &by_shape else {
            panic!("a record");
        };
        assert!(matches!(fields[0].1, Value::Union(0, _)), "{by_shape:?}");

        let by_name = resolve(retire.clone(), schema, schema).unwrap();
        assert_eq!(by_name, retire);
    }
}
