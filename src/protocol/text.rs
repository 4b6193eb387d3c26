//! Names, ids and other strings of the protocol: the rule they follow
//! ([`check_text`]) and the type that declares it in the spec ([`Text`]).

use std::borrow::Cow;
use std::marker::PhantomData;
use std::ops::Deref;

use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::types::{ParseError, ParseFromJSON, ParseFromParameter, ParseResult, ToJSON, Type};
use serde_json::Value;

use super::{MAX_ID_CHARS, MAX_NAME_CHARS, MAX_STREAM_COLLECTIONS};

/// How a name or id breaks the protocol's rule for them: 1 to `max`
/// characters, no control characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadText {
    /// Empty, or longer than the limit.
    Length,
    /// A NUL character, which the database cannot store.
    Nul,
    /// Another control character.
    Control,
}

/// Checks a name or id against the protocol's rule: 1 to `max` characters
/// (Unicode scalar values, what JSON Schema's `maxLength` counts), no
/// control characters.
pub fn check_text(value: &str, max: usize) -> Result<(), BadText> {
    if value.is_empty() || value.chars().nth(max).is_some() {
        Err(BadText::Length)
    } else if value.contains('\0') {
        Err(BadText::Nul)
    } else if value.chars().any(char::is_control) {
        Err(BadText::Control)
    } else {
        Ok(())
    }
}

/// A JSON string, strictly: unlike poem-openapi's `String`, a number or a
/// boolean where a string belongs is a 400, not silently converted. `R` is
/// the rule the spec declares for it; any string parses, so that the
/// validation that follows says which rule it breaks, with its own code.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Text<R = Any>(pub String, PhantomData<R>);

/// What the spec says of a kind of [`Text`].
pub trait Rule: Send + Sync + 'static {
    /// Its name in poem-openapi's type errors.
    const NAME: &'static str;
    fn schema() -> MetaSchema;
}

/// An app id, table (collection) or field name.
pub type Name = Text<Bounded<1, MAX_NAME_CHARS>>;
/// A record id, client id or idempotency key.
pub type Id = Text<Bounded<1, MAX_ID_CHARS>>;
/// A client id in a header, where an empty one counts as none.
pub type HeaderId = Text<Header<0, MAX_ID_CHARS>>;
/// An idempotency key (a header).
pub type Key = Text<Header<1, MAX_ID_CHARS>>;
/// A record or field time (RFC 3339).
pub type Time = Text<DateTime>;
/// A cursor: a `syncedUntil`, any RFC 3339 time, or empty for the beginning.
pub type Since = Text<CursorString>;

/// Any string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Any;

impl Rule for Any {
    const NAME: &'static str = "string";
    fn schema() -> MetaSchema {
        MetaSchema::new("string")
    }
}

/// `MIN` to `MAX` characters ([`check_text`]), no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bounded<const MIN: usize, const MAX: usize>;

/// Any character but a control character (`char::is_control`: C0, DEL, C1).
const NO_CONTROL: &str = r"^[^\u0000-\u001F\u007F-\u009F]*$";

impl<const MIN: usize, const MAX: usize> Rule for Bounded<MIN, MAX> {
    const NAME: &'static str = "string(bounded)";
    fn schema() -> MetaSchema {
        MetaSchema {
            min_length: (MIN > 0).then_some(MIN),
            max_length: Some(MAX),
            pattern: Some(NO_CONTROL.to_owned()),
            ..MetaSchema::new("string")
        }
    }
}

/// `MIN` to `MAX` printable ASCII characters: all that a header value
/// carries reliably (HTTP gives other bytes no encoding).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header<const MIN: usize, const MAX: usize>;

impl<const MIN: usize, const MAX: usize> Rule for Header<MIN, MAX> {
    const NAME: &'static str = "string(header)";
    fn schema() -> MetaSchema {
        MetaSchema {
            pattern: Some(r"^[\x20-\x7E]*$".to_owned()),
            ..Bounded::<MIN, MAX>::schema()
        }
    }
}

/// An RFC 3339 time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DateTime;

impl Rule for DateTime {
    const NAME: &'static str = "string(date-time)";
    fn schema() -> MetaSchema {
        MetaSchema::new_with_format("string", "date-time")
    }
}

/// A cursor this server returned, any RFC 3339 time (every cursor is
/// one), or empty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CursorString;

/// The form of the cursors this server returns: a UTC time with nine
/// fractional digits. Its days of February stop at the 28th, so that every
/// string it matches is a valid time (the `date-time` branch takes the 29th).
const RETURNED_CURSOR: &str = concat!(
    r"^[0-9]{4}-(",
    r"(0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])",
    r"|(0[469]|11)-(0[1-9]|[12][0-9]|30)",
    r"|02-(0[1-9]|1[0-9]|2[0-8])",
    r")T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]\.[0-9]{9}Z$",
);

impl Rule for CursorString {
    const NAME: &'static str = "string(cursor)";
    fn schema() -> MetaSchema {
        // A returned cursor is also a `date-time`, but generated clients
        // turn that format into their time type, which may not hold
        // nanoseconds (Python's keeps microseconds): a cursor sent back
        // that way comes back earlier, and the changes after it again. As a
        // plain string of its own they send it back verbatim.
        let returned = MetaSchema {
            description: Some("A `syncedUntil` this server returned, sent back as it came."),
            pattern: Some(RETURNED_CURSOR.to_owned()),
            ..MetaSchema::new("string")
        };
        let empty = MetaSchema {
            enum_items: vec![Value::from("")],
            ..MetaSchema::new("string")
        };
        MetaSchema {
            any_of: vec![
                MetaSchemaRef::Inline(Box::new(returned)),
                MetaSchemaRef::Inline(Box::new(DateTime::schema())),
                MetaSchemaRef::Inline(Box::new(empty)),
            ],
            ..MetaSchema::ANY
        }
    }
}

impl<R> Deref for Text<R> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl<R: Rule> Type for Text<R> {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        R::NAME.into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(R::schema()))
    }

    fn as_raw_value(&self) -> Option<&Self> {
        Some(self)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }
}

impl<R: Rule> ParseFromJSON for Text<R> {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value {
            Some(Value::String(s)) => Ok(Text(s, PhantomData)),
            other => Err(ParseError::expected_type(other.unwrap_or_default())),
        }
    }
}

impl<R: Rule> ParseFromParameter for Text<R> {
    fn parse_from_parameter(value: &str) -> ParseResult<Self> {
        Ok(Text(value.to_owned(), PhantomData))
    }
}

impl<R: Rule> ToJSON for Text<R> {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(self.0.clone()))
    }
}

impl<R> From<Text<R>> for String {
    fn from(text: Text<R>) -> String {
        text.0
    }
}

/// Comma-separated names (`todos,lists`): the collections a stream follows,
/// 1 to [`MAX_STREAM_COLLECTIONS`] of them. Any string parses; the stream's
/// validation says what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NameList(pub Vec<String>);

impl Type for NameList {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "string(names)".into()
    }

    /// A string rather than an array: poem-openapi's comma-separated
    /// arrays (`explode = false`) panic on a missing parameter.
    fn schema_ref() -> MetaSchemaRef {
        let name = format!(r"[^,\u0000-\u001F\u007F-\u009F]{{1,{MAX_NAME_CHARS}}}");
        let more = MAX_STREAM_COLLECTIONS - 1;
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            pattern: Some(format!("^{name}(,{name}){{0,{more}}}$")),
            ..MetaSchema::new("string")
        }))
    }

    fn as_raw_value(&self) -> Option<&Self> {
        Some(self)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }
}

impl ParseFromParameter for NameList {
    fn parse_from_parameter(value: &str) -> ParseResult<Self> {
        Ok(NameList(value.split(',').map(str::to_owned).collect()))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cursor::Cursor;

    proptest! {
        /// The spec's branch for returned cursors admits nothing the server
        /// refuses (schemathesis sends such strings and expects a success).
        #[test]
        fn every_string_of_the_returned_cursor_form_is_a_cursor(
            s in proptest::string::string_regex(RETURNED_CURSOR.trim_start_matches('^').trim_end_matches('$')).unwrap()
        ) {
            prop_assert!(Cursor::parse(&s).is_ok(), "{s}");
        }
    }
}
