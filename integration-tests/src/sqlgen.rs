//! A random SQL generator for differential testing (in the spirit of SQLancer): queries over
//! tables described by their Arrow schemas, with literals drawn from the tables' own values
//! (so predicates select some rows, not none or all), in the SQL DataFusion and PostgreSQL
//! share. Each generated case comes with the queries its oracles compare:
//!
//! - **plain**: the query itself, whose rows every engine must agree on;
//! - **TLP** (ternary logic partitioning): the rows where a predicate `p` is true, false and
//!   NULL partition the table, so the three counts add up to the table's count;
//! - **NoREC** (non-optimizing reference engine construction): `count(*) WHERE p` equals
//!   `sum(CASE WHEN p THEN 1 ELSE 0 END)` over all rows, which no optimizer can push down.

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions};

pub use strata_fuzzing::mutate::Rng;

/// What a column holds, as far as the generator's SQL cares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Int,
    /// `DECIMAL(p, s)`: literals are cast to it so both engines compare exact values.
    Decimal(u8, i8),
    Float,
    Date,
    Timestamp,
    Text,
    Bool,
}

impl Kind {
    fn of(t: &DataType) -> Option<Self> {
        Some(match t {
            DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => Kind::Int,
            DataType::Decimal128(p, s) => Kind::Decimal(*p, *s),
            DataType::Float32 | DataType::Float64 => Kind::Float,
            DataType::Date32 => Kind::Date,
            DataType::Timestamp(_, None) => Kind::Timestamp,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Kind::Text,
            DataType::Boolean => Kind::Bool,
            _ => return None,
        })
    }

    fn numeric(self) -> bool {
        matches!(self, Kind::Int | Kind::Decimal(..) | Kind::Float)
    }
}

/// A column: its name, kind, whether it has NULLs, and literals of values it holds.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub kind: Kind,
    pub samples: Vec<String>,
}

/// A table the generator may query.
#[derive(Debug, Clone)]
pub struct Table {
    pub name: String,
    pub columns: Vec<Column>,
}

impl Table {
    /// Describes `name` from its data: columns of kinds the generator knows, with up to 16
    /// values of each as SQL literals.
    pub fn from_batches(name: &str, batches: &[RecordBatch], rng: &mut Rng) -> Self {
        let schema = batches[0].schema();
        let options = FormatOptions::default();
        let mut columns = Vec::new();
        for (i, field) in schema.fields().iter().enumerate() {
            let Some(kind) = Kind::of(field.data_type()) else { continue };
            let mut samples = Vec::new();
            for _ in 0..16 {
                let batch = rng.pick(batches);
                if batch.num_rows() == 0 {
                    continue;
                }
                let column = batch.column(i);
                let row = rng.below(batch.num_rows());
                if column.is_null(row) {
                    continue;
                }
                let text =
                    ArrayFormatter::try_new(column.as_ref(), &options).expect("formatter").value(row).to_string();
                samples.push(literal(kind, &text));
            }
            if samples.is_empty() {
                samples.push(literal(kind, default_value(kind)));
            }
            samples.sort();
            samples.dedup();
            columns.push(Column { name: field.name().clone(), kind, samples });
        }
        Table { name: name.to_string(), columns }
    }
}

fn default_value(kind: Kind) -> &'static str {
    match kind {
        Kind::Int | Kind::Decimal(..) | Kind::Float => "0",
        Kind::Date => "2000-01-01",
        Kind::Timestamp => "2000-01-01T00:00:00",
        Kind::Text => "",
        Kind::Bool => "true",
    }
}

/// A value as a literal both engines read as the column's type.
fn literal(kind: Kind, text: &str) -> String {
    match kind {
        Kind::Int => text.to_string(),
        Kind::Decimal(p, s) => format!("CAST('{text}' AS DECIMAL({p}, {s}))"),
        Kind::Float => format!("CAST('{text}' AS DOUBLE PRECISION)"),
        Kind::Date => format!("DATE '{text}'"),
        Kind::Timestamp => format!("TIMESTAMP '{}'", text.replace('T', " ")),
        Kind::Text => format!("'{}'", text.replace('\'', "''")),
        Kind::Bool => text.to_string(),
    }
}

/// A join the generator may use: `left.left_column = right.right_column`.
#[derive(Debug, Clone)]
pub struct Join {
    pub left: String,
    pub left_column: String,
    pub right: String,
    pub right_column: String,
}

/// One generated case: the plain query and its oracles' queries.
#[derive(Debug, Clone)]
pub struct Case {
    /// Rows every engine must agree on (compared as multisets; ordered where it says).
    pub query: String,
    /// `SELECT count(*)` over the same FROM clause with no predicate.
    pub count_all: String,
    /// Counts where the predicate is true, false and NULL (TLP): they add up to `count_all`.
    pub partitions: [String; 3],
    /// `sum(CASE WHEN p ...)` over all rows (NoREC): equals `partitions[0]`.
    pub unoptimized: String,
}

/// Generates cases over `tables`, joined only along `joins`.
pub struct Generator<'a> {
    tables: &'a [Table],
    joins: &'a [Join],
    rng: Rng,
}

impl<'a> Generator<'a> {
    pub fn new(tables: &'a [Table], joins: &'a [Join], seed: u64) -> Self {
        Self { tables, joins, rng: Rng::new(seed) }
    }

    /// The next case.
    pub fn case(&mut self) -> Case {
        let (from, columns) = self.relation();
        let predicate = self.predicate(&columns, 0);
        let count_all = format!("SELECT count(*) FROM {from}");
        let partitions = [
            format!("SELECT count(*) FROM {from} WHERE {predicate}"),
            format!("SELECT count(*) FROM {from} WHERE NOT ({predicate})"),
            format!("SELECT count(*) FROM {from} WHERE ({predicate}) IS NULL"),
        ];
        let unoptimized = format!("SELECT coalesce(sum(CASE WHEN {predicate} THEN 1 ELSE 0 END), 0) FROM {from}");
        let query = match self.rng.below(4) {
            0 => self.aggregate(&from, &columns, &predicate),
            1 => {
                let projection = self.projection(&columns);
                let order: Vec<String> = (1..=projection.len()).map(|i| i.to_string()).collect();
                format!(
                    "SELECT {} FROM {from} WHERE {predicate} ORDER BY {} LIMIT {}",
                    projection.join(", "),
                    order.join(", "),
                    1 + self.rng.below(20)
                )
            }
            2 => format!("SELECT DISTINCT {} FROM {from} WHERE {predicate}", self.projection(&columns).join(", ")),
            _ => format!("SELECT {} FROM {from} WHERE {predicate}", self.projection(&columns).join(", ")),
        };
        Case { query, count_all, partitions, unoptimized }
    }

    /// One table, or two along a join; the columns in scope, qualified.
    fn relation(&mut self) -> (String, Vec<(String, Kind, Vec<String>)>) {
        let scoped = |table: &Table, alias: &str| -> Vec<(String, Kind, Vec<String>)> {
            table.columns.iter().map(|c| (format!("{alias}.{}", c.name), c.kind, c.samples.clone())).collect()
        };
        if !self.joins.is_empty() && self.rng.chance(40) {
            let join = self.rng.pick(self.joins).clone();
            let left = self.table(&join.left);
            let right = self.table(&join.right);
            let kind = if self.rng.chance(20) { "LEFT JOIN" } else { "JOIN" };
            let from = format!(
                "{} AS l {kind} {} AS r ON l.{} = r.{}",
                left.name, right.name, join.left_column, join.right_column
            );
            let mut columns = scoped(left, "l");
            columns.extend(scoped(right, "r"));
            (from, columns)
        } else {
            let table = self.rng.pick(self.tables);
            (format!("{} AS t", table.name), scoped(table, "t"))
        }
    }

    fn table(&self, name: &str) -> &'a Table {
        self.tables.iter().find(|t| t.name == name).expect("a join names known tables")
    }

    fn projection(&mut self, columns: &[(String, Kind, Vec<String>)]) -> Vec<String> {
        let n = 1 + self.rng.below(3);
        (0..n)
            .map(|_| {
                let (name, kind, samples) = self.rng.pick(columns).clone();
                match kind {
                    Kind::Int if self.rng.chance(30) => format!("{name} + {}", self.rng.pick(&samples)),
                    Kind::Text if self.rng.chance(20) => format!("upper({name})"),
                    Kind::Text if self.rng.chance(20) => format!("length({name})"),
                    _ => name,
                }
            })
            .collect()
    }

    fn aggregate(&mut self, from: &str, columns: &[(String, Kind, Vec<String>)], predicate: &str) -> String {
        let group = self.rng.pick(columns).0.clone();
        let mut selects = vec![group.clone(), "count(*)".to_string()];
        let numeric: Vec<&(String, Kind, Vec<String>)> = columns.iter().filter(|c| c.1.numeric()).collect();
        if !numeric.is_empty() {
            let (name, _, _) = *self.rng.pick(&numeric);
            let function = *self.rng.pick(&["sum", "min", "max", "count"]);
            selects.push(format!("{function}({name})"));
        }
        let (other, _, _) = self.rng.pick(columns);
        selects.push(format!("{}({other})", self.rng.pick(&["min", "max", "count"])));
        let having = if self.rng.chance(30) { " HAVING count(*) > 1".to_string() } else { String::new() };
        format!("SELECT {} FROM {from} WHERE {predicate} GROUP BY {group}{having}", selects.join(", "))
    }

    /// A boolean expression over `columns`, nested at most three deep.
    fn predicate(&mut self, columns: &[(String, Kind, Vec<String>)], depth: usize) -> String {
        if depth < 3 && self.rng.chance(40) {
            let left = self.predicate(columns, depth + 1);
            return match self.rng.below(3) {
                0 => format!("({left} AND {})", self.predicate(columns, depth + 1)),
                1 => format!("({left} OR {})", self.predicate(columns, depth + 1)),
                _ => format!("(NOT {left})"),
            };
        }
        let (name, kind, samples) = self.rng.pick(columns).clone();
        let value = self.rng.pick(&samples).clone();
        let operators = ["=", "<>", "<", "<=", ">", ">="];
        match self.rng.below(8) {
            0 => format!("{name} BETWEEN {value} AND {}", self.rng.pick(&samples)),
            1 => {
                let list: Vec<String> = (0..1 + self.rng.below(4)).map(|_| self.rng.pick(&samples).clone()).collect();
                let not = if self.rng.chance(30) { "NOT " } else { "" };
                format!("{name} {not}IN ({})", list.join(", "))
            }
            2 => format!("{name} IS {}NULL", if self.rng.chance(50) { "NOT " } else { "" }),
            3 if kind == Kind::Text => {
                let prefix: String = value.trim_matches('\'').chars().take(1 + self.rng.below(3)).collect();
                format!("{name} LIKE '{}%'", prefix.replace('\'', "''").replace('%', ""))
            }
            4 if kind == Kind::Int => format!("{name} + {value} {} {value}", self.rng.pick(&operators)),
            5 => {
                // Two columns of one kind compared with each other.
                let same: Vec<&(String, Kind, Vec<String>)> =
                    columns.iter().filter(|c| c.1 == kind && c.0 != name).collect();
                match same.is_empty() {
                    true => format!("{name} {} {value}", self.rng.pick(&operators)),
                    false => format!("{name} {} {}", self.rng.pick(&operators), self.rng.pick(&same).0),
                }
            }
            6 if kind == Kind::Bool => name,
            _ => format!("{name} {} {value}", self.rng.pick(&operators)),
        }
    }
}
