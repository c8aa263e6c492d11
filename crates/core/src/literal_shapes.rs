//! Literal SQL recognized by its tokens. [`crate::parameterize`] takes a query's comparison
//! literals out of its parsed statement, so `WHERE id = 42` and `WHERE id = 43` share one
//! plan; but each text is still parsed, its statement walked and printed to find that
//! shape (three quarters of a literal key lookup's instructions). A text whose tokens are
//! those of one already parameterized, literals aside, takes its literals out by their
//! places among its tokens instead, and is never parsed.
//!
//! A [`Skeleton`] is the text with each number and single-quoted string token replaced by a
//! marker of its kind. Two texts with the same skeleton are the same characters outside
//! their literals, so they tokenize, parse and plan alike but for those literals' values.
//! Its [`Recipe`], made from the first text's parameterized statement, says which literal
//! becomes which parameter; every other literal (a `LIMIT`, a projected constant, an
//! `INTERVAL`) must be the same text as in that first query, or the query is parsed.

use datafusion::common::ScalarValue;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Location, Token, Tokenizer};

use crate::parameterize::Parameterized;

/// Stands for a literal in a skeleton; SQL text containing it is never given one.
const MARK: char = '\u{0}';

/// A text's skeleton and its literals, in text order.
#[cfg_attr(test, derive(Debug, PartialEq))]
pub(crate) struct Skeleton<'a> {
    /// The text with each literal replaced by [`MARK`] and its kind.
    pub key: String,
    literals: Vec<Literal<'a>>,
}

/// What [`Skeleton::scanned`] made of a text.
enum Scan<'a> {
    /// The skeleton (`None`: the text has no literal).
    Plain(Option<Skeleton<'a>>),
    /// The text holds something only the tokenizer reads right.
    NeedsTokenizer,
}

#[cfg_attr(test, derive(Debug, PartialEq))]
struct Literal<'a> {
    start: Location,
    /// The literal as written (quotes included), compared for literals that stay in the text.
    source: &'a str,
    token: Token,
}

/// Where each literal of a skeleton goes.
#[derive(Debug)]
pub(crate) struct Recipe {
    /// The plan cache key of the parameterized statement (its text).
    pub shape_key: String,
    slots: Vec<Slot>,
}

#[derive(Debug, PartialEq)]
enum Slot {
    /// Bound to the parameter at this position, negated when the text writes `-` before it.
    Parameter { position: usize, negative: bool },
    /// Stays in the text: only a query with this very literal shares the recipe.
    Fixed(String),
}

impl<'a> Skeleton<'a> {
    /// The skeleton of `sql` as DataFusion's parser tokenizes it, or `None` when it has no
    /// literal, does not tokenize, or holds [`MARK`] itself.
    pub(crate) fn of(sql: &'a str) -> Option<Self> {
        if sql.contains(MARK) {
            return None;
        }
        match Self::scanned(sql) {
            Scan::Plain(skeleton) => skeleton,
            Scan::NeedsTokenizer => Self::tokenized(sql),
        }
    }

    /// [`Skeleton::of`] by a single pass over the bytes, for the plain texts that are most
    /// of what applications send (words, numbers, quoted strings, operators, spaces and
    /// newlines): the tokenizer costs a literal key lookup more instructions than all the
    /// rest of finding its plan. It gives the tokenizer's skeleton exactly or gives up:
    /// anything whose tokens depend on more than its characters' classes (comments, quoted
    /// or non-ASCII names, escapes or doubled quotes in a string, prefixed strings like
    /// `E'..'`, numbers with a point, an exponent, a base or a suffix, `:name`, `@`, `#`,
    /// `\r`) goes to the tokenizer. `tests::scanning_agrees_with_the_tokenizer` holds it
    /// to that over generated texts.
    fn scanned(sql: &'a str) -> Scan<'a> {
        let bytes = sql.as_bytes();
        let mut key = String::with_capacity(sql.len());
        let mut literals = Vec::new();
        let (mut line, mut column) = (1u64, 1u64);
        // Start of the text not yet copied into `key`.
        let mut copied = 0;
        let mut i = 0;
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        while i < bytes.len() {
            let at = i;
            let start = Location::new(line, column);
            // Where the token at `at` ends, and its kind and value when it is a literal.
            let (end, literal) = match bytes[at] {
                b'\n' => {
                    (line, column) = (line + 1, 1);
                    i += 1;
                    continue;
                }
                b' ' | b'\t' | b'(' | b')' | b',' | b'=' | b'<' | b'>' | b'!' | b'*' | b'+' | b'%' | b';' | b'|'
                | b'&' | b'^' | b'~' => (at + 1, None),
                // A comment.
                b'-' if bytes.get(at + 1) == Some(&b'-') => return Scan::NeedsTokenizer,
                b'/' if bytes.get(at + 1) == Some(&b'*') => return Scan::NeedsTokenizer,
                // Only the `.` of a qualified name (`t.v`, `t.*`): any other, a `.5`, `t.1` or
                // `;._x`, the tokenizer reads its own way.
                b'.' if !(at > 0
                    && word(bytes[at - 1])
                    && bytes.get(at + 1).is_some_and(|b| word(*b) || *b == b'*'))
                    || bytes.get(at + 1).is_some_and(u8::is_ascii_digit) =>
                {
                    return Scan::NeedsTokenizer;
                }
                b'-' | b'/' | b'.' => (at + 1, None),
                b':' if bytes.get(at + 1) == Some(&b':') => (at + 2, None),
                b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                    let end = at + bytes[at..].iter().take_while(|b| word(**b)).count();
                    // `E'..'`, `N'..'`, `X'..'`: a prefixed string.
                    if bytes.get(end) == Some(&b'\'') {
                        return Scan::NeedsTokenizer;
                    }
                    (end, None)
                }
                b'0'..=b'9' => {
                    let end = at + bytes[at..].iter().take_while(|b| b.is_ascii_digit()).count();
                    // `1.5`, `1e3`, `0x1f`, `1_000`, `1L`.
                    if bytes.get(end).is_some_and(|b| word(*b) || *b == b'.' || *b == b'\'') {
                        return Scan::NeedsTokenizer;
                    }
                    (end, Some(('#', Token::Number(sql[at..end].to_string(), false))))
                }
                b'\'' => {
                    let Some(length) = bytes[at + 1..].iter().position(|b| *b == b'\'') else {
                        return Scan::NeedsTokenizer;
                    };
                    let end = at + 1 + length + 1;
                    let content = &sql[at + 1..end - 1];
                    // `'it''s'`, an escape, a line break, or a string run into a word.
                    if content.contains(['\\', '\n', '\r']) || bytes.get(end).is_some_and(|b| word(*b) || *b == b'\'') {
                        return Scan::NeedsTokenizer;
                    }
                    (end, Some(('\'', Token::SingleQuotedString(content.to_string()))))
                }
                _ => return Scan::NeedsTokenizer,
            };
            // Columns count characters: only a string holds any that are not ASCII.
            column += sql[at..end].chars().count() as u64;
            i = end;
            if let Some((kind, token)) = literal {
                key.push_str(&sql[copied..at]);
                key.push(MARK);
                key.push(kind);
                copied = end;
                literals.push(Literal { start, source: &sql[at..end], token });
            }
        }
        key.push_str(&sql[copied..]);
        Scan::Plain((!literals.is_empty()).then_some(Skeleton { key, literals }))
    }

    /// [`Skeleton::of`] by DataFusion's own tokenizer: any text.
    fn tokenized(sql: &'a str) -> Option<Self> {
        let tokens = Tokenizer::new(&GenericDialect {}, sql).tokenize_with_location().ok()?;
        let mut key = String::with_capacity(sql.len());
        let mut literals = Vec::new();
        // The tokens tile the text: each starts where the one before ended. Their spans give
        // lines and columns (in characters), so the walk keeps both with the byte offset.
        let mut cursor = Cursor { rest: sql, offset: 0, at: Location::new(1, 1) };
        for token in tokens {
            if token.span.start != cursor.at {
                return None;
            }
            let start = cursor.offset;
            cursor.advance_to(token.span.end)?;
            let source = &sql[start..cursor.offset];
            let kind = match &token.token {
                Token::Number(..) => '#',
                Token::SingleQuotedString(_) => '\'',
                _ => {
                    key.push_str(source);
                    continue;
                }
            };
            key.push(MARK);
            key.push(kind);
            literals.push(Literal { start: token.span.start, source, token: token.token });
        }
        if literals.is_empty() || !cursor.rest.is_empty() {
            return None;
        }
        Some(Skeleton { key, literals })
    }

    /// The values this text binds into its recipe's shape, or `None` when a literal that
    /// stays in the text differs from the recipe's or a parameter's literal is not one
    /// [`crate::parameterize`] would take out (a decimal where the first query had an integer).
    pub(crate) fn values(&self, recipe: &Recipe) -> Option<Vec<ScalarValue>> {
        if recipe.slots.len() != self.literals.len() {
            return None;
        }
        let count = recipe.slots.iter().filter(|s| matches!(s, Slot::Parameter { .. })).count();
        let mut values = vec![ScalarValue::Null; count];
        for (slot, literal) in recipe.slots.iter().zip(&self.literals) {
            match slot {
                Slot::Fixed(source) if source == literal.source => {}
                Slot::Fixed(_) => return None,
                Slot::Parameter { position, negative } => {
                    *values.get_mut(*position)? = literal.value(*negative)?;
                }
            }
        }
        Some(values)
    }

    /// How texts of this skeleton take their literals out, learned from this text and its
    /// parameterized statement; `None` unless every value it took is a literal token of this
    /// text and reading them back by the recipe gives exactly its values.
    pub(crate) fn recipe(&self, shape: &Parameterized) -> Option<Recipe> {
        let mut slots: Vec<Slot> = self.literals.iter().map(|l| Slot::Fixed(l.source.to_string())).collect();
        for (position, taken) in shape.taken.iter().enumerate() {
            let index = self.literals.iter().position(|l| l.start == taken.start)?;
            if matches!(slots[index], Slot::Parameter { .. }) {
                return None;
            }
            slots[index] = Slot::Parameter { position, negative: taken.negative };
        }
        let recipe = Recipe { shape_key: shape.key.clone(), slots };
        (self.values(&recipe)? == shape.values).then_some(recipe)
    }
}

impl Literal<'_> {
    /// The value [`crate::parameterize`] takes out of such a literal.
    fn value(&self, negative: bool) -> Option<ScalarValue> {
        match &self.token {
            Token::Number(digits, false) if digits.bytes().all(|b| b.is_ascii_digit()) => {
                let n: i64 = if negative { format!("-{digits}").parse().ok()? } else { digits.parse().ok()? };
                Some(ScalarValue::Int64(Some(n)))
            }
            Token::SingleQuotedString(s) if !negative => Some(ScalarValue::Utf8(Some(s.clone()))),
            _ => None,
        }
    }
}

impl Recipe {
    /// Bytes this recipe holds, with its skeleton: its weight in the plan cache.
    pub(crate) fn bytes(&self, skeleton: &str) -> usize {
        let fixed: usize = self.slots.iter().map(|s| if let Slot::Fixed(text) = s { text.len() } else { 0 }).sum();
        skeleton.len() + self.shape_key.len() + fixed + self.slots.len() * std::mem::size_of::<Slot>()
    }
}

/// A walk over a text that knows the line and column (in characters, from 1) of its place,
/// as sqlparser's tokenizer counts them.
struct Cursor<'a> {
    rest: &'a str,
    offset: usize,
    at: Location,
}

impl Cursor<'_> {
    fn advance_to(&mut self, end: Location) -> Option<()> {
        let mut chars = self.rest.char_indices();
        while self.at != end {
            let (_, c) = chars.next()?;
            if c == '\n' {
                self.at = Location::new(self.at.line + 1, 1);
            } else {
                self.at = Location::new(self.at.line, self.at.column + 1);
            }
        }
        let consumed = chars.next().map_or(self.rest.len(), |(i, _)| i);
        self.offset += consumed;
        self.rest = &self.rest[consumed..];
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::parser::DFParser;

    fn shape(sql: &str) -> Parameterized {
        let statement = DFParser::parse_sql(sql).expect("parse").pop_front().expect("one statement");
        crate::parameterize::parameterize(sql, &statement).expect("parameterized")
    }

    fn recipe(sql: &str) -> Recipe {
        Skeleton::of(sql).expect("skeleton").recipe(&shape(sql)).expect("recipe")
    }

    /// What a text binds by the recipe of `first`, checked against parsing it.
    fn values_by_tokens(first: &str, then: &str) -> Option<Vec<ScalarValue>> {
        let recipe = recipe(first);
        let skeleton = Skeleton::of(then).expect("skeleton");
        if skeleton.key != Skeleton::of(first).expect("skeleton").key {
            return None;
        }
        let values = skeleton.values(&recipe)?;
        let parsed = shape(then);
        assert_eq!(parsed.key, recipe.shape_key, "{then}");
        assert_eq!(parsed.values, values, "{then}");
        Some(values)
    }

    #[test]
    fn texts_differing_in_literals_share_a_skeleton_and_bind_as_parsing_would() {
        let ints = |n: i64| ScalarValue::Int64(Some(n));
        let text = |s: &str| ScalarValue::Utf8(Some(s.into()));
        assert_eq!(
            values_by_tokens("SELECT v FROM t WHERE id = 42", "SELECT v FROM t WHERE id = 7"),
            Some(vec![ints(7)])
        );
        assert_eq!(
            values_by_tokens(
                "SELECT v FROM t\n  WHERE name <> 'a''b' AND (-7 < n OR k IN (1, 2)) AND b BETWEEN 3 AND 4 LIMIT 5",
                "SELECT v FROM t\n  WHERE name <> 'héllo' AND (-0 < n OR k IN (9223372036854775807, 0)) AND b BETWEEN 30 AND 4 LIMIT 5",
            ),
            Some(vec![text("héllo"), ints(0), ints(i64::MAX), ints(0), ints(30), ints(4)])
        );
        // Written before the column, and as the lowest integer.
        assert_eq!(
            values_by_tokens("SELECT * FROM t WHERE -1 = id", "SELECT * FROM t WHERE -9223372036854775808 = id"),
            Some(vec![ints(i64::MIN)])
        );
    }

    #[test]
    fn literals_that_stay_in_the_text_must_be_the_same() {
        // LIMIT and a projected constant keep their meaning only as written.
        assert!(
            values_by_tokens("SELECT v, 1 FROM t WHERE id = 1 LIMIT 5", "SELECT v, 1 FROM t WHERE id = 2 LIMIT 6")
                .is_none()
        );
        assert!(values_by_tokens("SELECT v, 1 FROM t WHERE id = 1", "SELECT v, 2 FROM t WHERE id = 2").is_none());
        assert!(values_by_tokens("SELECT v, 1 FROM t WHERE id = 1", "SELECT v, 1 FROM t WHERE id = 2").is_some());
    }

    #[test]
    fn a_literal_parsing_would_not_take_out_is_parsed() {
        // The recipe's slot holds an integer; a decimal, an overflow or `L` is not one.
        let recipe = recipe("SELECT v FROM t WHERE id = 1");
        for other in [
            "SELECT v FROM t WHERE id = 1.5",
            "SELECT v FROM t WHERE id = 99999999999999999999",
            "SELECT v FROM t WHERE id = 1e3",
        ] {
            let skeleton = Skeleton::of(other).expect("skeleton");
            assert!(skeleton.values(&recipe).is_none(), "{other}");
        }
        // A string where the first query had a number has another skeleton.
        assert_ne!(
            Skeleton::of("SELECT v FROM t WHERE id = '1'").expect("s").key,
            Skeleton::of("SELECT v FROM t WHERE id = 1").expect("s").key
        );
    }

    /// Texts made of pieces the scanner must read as the tokenizer does, and pieces it must
    /// leave to the tokenizer, in random order (a fixed seed: the same texts every run).
    #[test]
    fn scanning_agrees_with_the_tokenizer() {
        // What plain texts are made of; the scanner must read any mix of these.
        const PLAIN: &[&str] = &[
            "SELECT",
            "v",
            "t1",
            "id",
            "_x2",
            "FROM",
            "WHERE",
            "AND",
            "IN",
            "0",
            "42",
            "007",
            "9223372036854775807",
            "99999999999999999999",
            "'a'",
            "'héllo'",
            "''",
            "=",
            "<>",
            "!=",
            "<=",
            "::",
            "-",
            "/",
            ".",
            ",",
            "(",
            ")",
            "*",
            "+",
            "%",
            "||",
            ";",
            " ",
            " ",
            " ",
            "\n",
            "\t",
            "->",
        ];
        // What it must leave to the tokenizer, or read as the tokenizer does when it can.
        const TRICKY: &[&str] = &[
            "1.5",
            "1e3",
            "0x1f",
            ".5",
            "1L",
            "1_0",
            "'it''s'",
            "'a\\b'",
            "E'x'",
            "N'y'",
            "'two\nlines'",
            "'run'x",
            "'",
            ":x",
            ":",
            "--c\n",
            "/*c*/",
            "\r\n",
            "é",
            "\"q 1\"",
            "`b`",
            "@",
            "#",
            "[a]",
            "\u{c}",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let (mut scanned, mut gave_up) = (0, 0);
        for _ in 0..20_000 {
            let piece = |next: &mut dyn FnMut(usize) -> usize| match next(12) {
                0 => TRICKY[next(TRICKY.len())],
                _ => PLAIN[next(PLAIN.len())],
            };
            let text: String = (0..1 + next(12)).map(|_| piece(&mut next)).collect();
            match Skeleton::scanned(&text) {
                Scan::Plain(skeleton) => {
                    assert_eq!(skeleton, Skeleton::tokenized(&text), "{text:?}");
                    scanned += 1;
                }
                Scan::NeedsTokenizer => gave_up += 1,
            }
        }
        assert!(scanned > 5_000 && gave_up > 4_000, "{scanned} scanned, {gave_up} left to the tokenizer");
        for lookup in [
            "SELECT v FROM points WHERE id = 42",
            "SELECT * FROM orders\n WHERE customer = 'acme' AND total >= -5 AND status IN ('a', 'b') LIMIT 10",
            "select name::text from users where id=7;",
        ] {
            let Scan::Plain(Some(skeleton)) = Skeleton::scanned(lookup) else { panic!("not scanned: {lookup}") };
            assert_eq!(Some(skeleton), Skeleton::tokenized(lookup), "{lookup}");
        }
    }

    #[test]
    fn whitespace_comments_and_names_are_part_of_the_skeleton() {
        let key = |sql| Skeleton::of(sql).expect("skeleton").key;
        assert_ne!(key("SELECT v FROM t WHERE id = 1"), key("SELECT v FROM t  WHERE id = 1"));
        assert_ne!(key("SELECT v FROM t WHERE id = 1"), key("SELECT v FROM u WHERE id = 1"));
        assert_ne!(key("SELECT v FROM t WHERE id = 1 -- a"), key("SELECT v FROM t WHERE id = 1 -- b"));
        assert_eq!(key("SELECT v FROM t WHERE id = 1 -- a"), key("SELECT v FROM t WHERE id = 22 -- a"));
        assert!(Skeleton::of("SELECT v FROM t").is_none(), "no literal");
        assert!(Skeleton::of("SELECT 'unterminated").is_none());
        assert!(Skeleton::of("SELECT v FROM t WHERE id = 1 AND s = '\u{0}#'").is_none());
    }
}
