//! The typed header line of a RecBole atomic file.
//!
//! RecBole names every column and its type on the first line, tab-separated,
//! e.g. `user_id:token`, `item_id:token`, `timestamp:float`. The type decides
//! how a field is parsed, so a header we cannot read is an error rather than a
//! guess.

use std::fmt;

use thiserror::Error;

/// The type of a column, as written after the last `:` of its header entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FieldType {
    /// A single string id (`token`).
    Token,
    /// Free text or space-separated tokens (`token_seq`), kept verbatim.
    TokenSeq,
    /// One number (`float`).
    Float,
    /// Space-separated numbers (`float_seq`).
    FloatSeq,
}

impl FieldType {
    /// The spelling used in headers.
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::Token => "token",
            FieldType::TokenSeq => "token_seq",
            FieldType::Float => "float",
            FieldType::FloatSeq => "float_seq",
        }
    }

    fn parse(s: &str) -> Option<FieldType> {
        match s {
            "token" => Some(FieldType::Token),
            "token_seq" => Some(FieldType::TokenSeq),
            "float" => Some(FieldType::Float),
            "float_seq" => Some(FieldType::FloatSeq),
            _ => None,
        }
    }
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One column of a header: its name and type.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Column {
    pub name: String,
    pub ty: FieldType,
}

impl fmt::Display for Column {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.ty)
    }
}

/// Why a header entry was rejected, with the entry's 1-based column index.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("column {column} ({entry:?}): {problem}")]
pub struct HeaderError {
    /// 1-based index of the offending entry.
    pub column: usize,
    /// The entry as written.
    pub entry: String,
    pub problem: HeaderProblem,
}

/// What is wrong with a header entry.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum HeaderProblem {
    #[error("expected name:type, found no \":type\"")]
    MissingType,
    #[error("expected a column name before \":\"")]
    EmptyName,
    #[error("expected type token, token_seq, float or float_seq, found {0:?}")]
    UnknownType(String),
    #[error("duplicate column name, first used by column {first}")]
    Duplicate { first: usize },
}

/// Parses a header line (without its line terminator) into columns.
///
/// The type follows the *last* `:`, so a name may itself contain colons.
pub fn parse_header(line: &str) -> Result<Vec<Column>, HeaderError> {
    let mut columns: Vec<Column> = Vec::new();
    for (i, entry) in line.split('\t').enumerate() {
        let err = |problem| HeaderError {
            column: i + 1,
            entry: entry.to_owned(),
            problem,
        };
        let (name, ty) = entry
            .rsplit_once(':')
            .ok_or_else(|| err(HeaderProblem::MissingType))?;
        if name.is_empty() {
            return Err(err(HeaderProblem::EmptyName));
        }
        let ty =
            FieldType::parse(ty).ok_or_else(|| err(HeaderProblem::UnknownType(ty.to_owned())))?;
        if let Some(first) = columns.iter().position(|c| c.name == name) {
            return Err(err(HeaderProblem::Duplicate { first: first + 1 }));
        }
        columns.push(Column {
            name: name.to_owned(),
            ty,
        });
    }
    Ok(columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, ty: FieldType) -> Column {
        Column {
            name: name.to_owned(),
            ty,
        }
    }

    #[test]
    fn parses_every_type_in_order() {
        let got =
            parse_header("item_id:token\ttitle:token_seq\tprice:float\temb:float_seq").unwrap();
        assert_eq!(
            got,
            vec![
                col("item_id", FieldType::Token),
                col("title", FieldType::TokenSeq),
                col("price", FieldType::Float),
                col("emb", FieldType::FloatSeq),
            ]
        );
    }

    #[test]
    fn type_follows_last_colon() {
        let got = parse_header("a:b:token").unwrap();
        assert_eq!(got, vec![col("a:b", FieldType::Token)]);
    }

    #[test]
    fn missing_type() {
        let err = parse_header("item_id:token\ttitle").unwrap_err();
        assert_eq!(err.column, 2);
        assert_eq!(err.problem, HeaderProblem::MissingType);
        assert_eq!(
            err.to_string(),
            "column 2 (\"title\"): expected name:type, found no \":type\""
        );
    }

    #[test]
    fn unknown_type() {
        let err = parse_header("item_id:token\tprice:int").unwrap_err();
        assert_eq!(err.column, 2);
        assert_eq!(err.problem, HeaderProblem::UnknownType("int".into()));
    }

    #[test]
    fn empty_name_and_trailing_tab() {
        assert_eq!(
            parse_header(":token").unwrap_err().problem,
            HeaderProblem::EmptyName
        );
        let err = parse_header("item_id:token\t").unwrap_err();
        assert_eq!((err.column, err.problem), (2, HeaderProblem::MissingType));
    }

    #[test]
    fn duplicate_column() {
        let err = parse_header("a:token\tb:float\ta:token_seq").unwrap_err();
        assert_eq!(err.column, 3);
        assert_eq!(err.problem, HeaderProblem::Duplicate { first: 1 });
    }
}
