//! What the server tells clients about itself (GetSqlInfo) and the SQL types it speaks
//! (GetXdbcTypeInfo). Built once: the answers do not change while the process runs.

use std::sync::OnceLock;

use arrow_flight::sql::metadata::{
    SqlInfoData, SqlInfoDataBuilder, XdbcTypeInfo, XdbcTypeInfoData, XdbcTypeInfoDataBuilder,
};
use arrow_flight::sql::{Nullable, Searchable, SqlInfo, SqlNullOrdering, SqlSupportedTransaction, XdbcDataType};
use datafusion::prelude::SessionContext;

/// SqlInfo for this server; keyword and function lists come from DataFusion itself.
pub fn sql_info(ctx: &SessionContext) -> &'static SqlInfoData {
    static INFO: OnceLock<SqlInfoData> = OnceLock::new();
    INFO.get_or_init(|| {
        let mut b = SqlInfoDataBuilder::new();
        b.append(SqlInfo::FlightSqlServerName, "Strata");
        b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        b.append(SqlInfo::FlightSqlServerArrowVersion, "59");
        b.append(SqlInfo::FlightSqlServerReadOnly, true);
        b.append(SqlInfo::FlightSqlServerSql, true);
        b.append(SqlInfo::FlightSqlServerSubstrait, false);
        b.append(SqlInfo::FlightSqlServerTransaction, SqlSupportedTransaction::None as i32);
        b.append(SqlInfo::FlightSqlServerCancel, false);
        b.append(SqlInfo::FlightSqlServerBulkIngestion, false);
        b.append(SqlInfo::FlightSqlServerStatementTimeout, 0i32);
        b.append(SqlInfo::SqlDdlCatalog, false);
        b.append(SqlInfo::SqlDdlSchema, false);
        b.append(SqlInfo::SqlDdlTable, false);
        b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        b.append(SqlInfo::SqlAllTablesAreSelectable, true);
        b.append(SqlInfo::SqlNullOrdering, SqlNullOrdering::SqlNullsSortedHigh as i32);
        b.append(SqlInfo::SqlSearchStringEscape, "\\");
        b.append(SqlInfo::SqlSupportsColumnAliasing, true);
        b.append(SqlInfo::SqlNullPlusNullIsNull, true);
        b.append(SqlInfo::SqlTransactionsSupported, false);
        let keywords: Vec<String> =
            datafusion::sql::sqlparser::keywords::ALL_KEYWORDS.iter().map(|k| k.to_string()).collect();
        b.append(SqlInfo::SqlKeywords, keywords);
        let state = ctx.state();
        let mut functions: Vec<String> = state.scalar_functions().keys().cloned().collect();
        functions.sort();
        let pick = |names: &[&str]| -> Vec<String> {
            functions.iter().filter(|f| names.contains(&f.as_str())).cloned().collect()
        };
        b.append(
            SqlInfo::SqlNumericFunctions,
            pick(&[
                "abs", "acos", "asin", "atan", "atan2", "ceil", "cos", "degrees", "exp", "floor", "ln", "log", "log10",
                "log2", "pi", "power", "radians", "random", "round", "signum", "sin", "sqrt", "tan", "trunc",
            ]),
        );
        b.append(
            SqlInfo::SqlStringFunctions,
            pick(&[
                "ascii",
                "btrim",
                "char_length",
                "concat",
                "concat_ws",
                "initcap",
                "left",
                "length",
                "lower",
                "lpad",
                "ltrim",
                "octet_length",
                "repeat",
                "replace",
                "reverse",
                "right",
                "rpad",
                "rtrim",
                "split_part",
                "starts_with",
                "strpos",
                "substr",
                "translate",
                "upper",
            ]),
        );
        b.append(
            SqlInfo::SqlDatetimeFunctions,
            pick(&[
                "current_date",
                "current_time",
                "date_bin",
                "date_part",
                "date_trunc",
                "from_unixtime",
                "make_date",
                "now",
                "to_char",
                "to_date",
                "to_timestamp",
                "to_unixtime",
            ]),
        );
        b.append(SqlInfo::SqlSystemFunctions, pick(&["arrow_typeof", "coalesce", "nullif", "version"]));
        b.build().unwrap_or_else(|_| SqlInfoDataBuilder::new().build().expect("empty SqlInfo builds"))
    })
}

/// The SQL types clients may see in results, described for JDBC/ODBC-style clients.
pub fn xdbc_type_info() -> &'static XdbcTypeInfoData {
    static INFO: OnceLock<XdbcTypeInfoData> = OnceLock::new();
    INFO.get_or_init(|| {
        let mut b = XdbcTypeInfoDataBuilder::new();
        let types: [(&str, XdbcDataType, Option<i32>, bool); 14] = [
            ("BOOLEAN", XdbcDataType::XdbcBit, Some(1), false),
            ("TINYINT", XdbcDataType::XdbcTinyint, Some(3), false),
            ("SMALLINT", XdbcDataType::XdbcSmallint, Some(5), false),
            ("INTEGER", XdbcDataType::XdbcInteger, Some(10), false),
            ("BIGINT", XdbcDataType::XdbcBigint, Some(19), false),
            ("REAL", XdbcDataType::XdbcReal, Some(7), false),
            ("DOUBLE", XdbcDataType::XdbcDouble, Some(15), false),
            ("DECIMAL", XdbcDataType::XdbcDecimal, Some(38), false),
            ("VARCHAR", XdbcDataType::XdbcVarchar, None, true),
            ("BINARY", XdbcDataType::XdbcVarbinary, None, false),
            ("DATE", XdbcDataType::XdbcDate, Some(10), false),
            ("TIME", XdbcDataType::XdbcTime, Some(18), false),
            ("TIMESTAMP", XdbcDataType::XdbcTimestamp, Some(29), false),
            ("INTERVAL", XdbcDataType::XdbcInterval, None, false),
        ];
        for (name, data_type, column_size, quoted) in types {
            b.append(XdbcTypeInfo {
                type_name: name.to_string(),
                data_type,
                column_size,
                literal_prefix: quoted.then(|| "'".to_string()),
                literal_suffix: quoted.then(|| "'".to_string()),
                create_params: None,
                nullable: Nullable::NullabilityNullable,
                case_sensitive: quoted,
                searchable: Searchable::Full,
                unsigned_attribute: Some(false),
                fixed_prec_scale: data_type == XdbcDataType::XdbcDecimal,
                auto_increment: Some(false),
                local_type_name: Some(name.to_string()),
                minimum_scale: None,
                maximum_scale: None,
                sql_data_type: data_type,
                datetime_subcode: None,
                num_prec_radix: column_size.map(|_| 10),
                interval_precision: None,
            });
        }
        b.build().unwrap_or_else(|_| XdbcTypeInfoDataBuilder::new().build().expect("empty type info builds"))
    })
}
