//! The Flight SQL metadata commands: catalogs, schemas, tables, table types and keys, each
//! answered in one record batch from the engine's DataFusion catalog (SQL info and XDBC
//! types are in `sql_info.rs`). Their tickets are the commands themselves, so any replica
//! can answer the DoGet.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema};
use arrow_flight::sql::{CommandGetCatalogs, CommandGetDbSchemas, CommandGetTables, ProstMessageExt};
use arrow_flight::{FlightDescriptor, FlightInfo};
use datafusion::catalog::TableProvider;
use datafusion::datasource::TableType;
use futures::stream;
use prost::Message;
use strata_core::auth::Access;
use tonic::{Response, Status};

use super::codec::encode;
use super::sql_service::{DoGetStream, StrataFlightSql};

impl StrataFlightSql {
    /// A FlightInfo whose ticket is the command itself, for the metadata commands.
    pub(super) fn metadata_info(
        &self,
        command: impl ProstMessageExt,
        schema: &Schema,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = command.as_any().encode_to_vec();
        Ok(Response::new(self.flight_info(schema, ticket, descriptor)?))
    }

    pub(super) fn batch_response<E: std::fmt::Display>(
        &self,
        batch: Result<RecordBatch, E>,
    ) -> Result<Response<DoGetStream>, Status> {
        let batch = batch.map_err(|e| Status::internal(e.to_string()))?;
        let schema = batch.schema();
        Ok(Response::new(encode(
            schema,
            stream::once(async { Ok(batch) }),
            self.engine.limits().max_message_size.as_usize(),
        )))
    }

    pub(super) fn catalogs(&self, query: CommandGetCatalogs) -> Result<RecordBatch, Status> {
        let mut builder = query.into_builder();
        let mut names = self.engine.session().catalog_names();
        names.sort();
        for name in names {
            builder.append(name);
        }
        builder.build().map_err(|e| Status::internal(e.to_string()))
    }

    /// The schemas; a restricted caller sees only those holding a dataset it may read.
    pub(super) async fn db_schemas(&self, query: CommandGetDbSchemas, access: &Access) -> Result<RecordBatch, Status> {
        let mut builder = query.into_builder();
        let ctx = self.engine.session();
        let visible: Vec<(String, String)> = match access.is_restricted() {
            true => self.catalog_tables(access).await.into_iter().map(|(c, s, _, _)| (c, s)).collect(),
            false => Vec::new(),
        };
        for catalog_name in ctx.catalog_names() {
            let Some(catalog) = ctx.catalog(&catalog_name) else { continue };
            for schema_name in catalog.schema_names() {
                if access.is_restricted() && !visible.iter().any(|(c, s)| *c == catalog_name && *s == schema_name) {
                    continue;
                }
                builder.append(&catalog_name, schema_name);
            }
        }
        builder.build().map_err(|e| Status::internal(e.to_string()))
    }

    /// Every table, with its Arrow schema when the client asked for it (the builder drops it
    /// otherwise), filtered by the command's patterns.
    pub(super) async fn tables(&self, query: CommandGetTables, access: &Access) -> Result<RecordBatch, Status> {
        let mut builder = query.into_builder();
        for (catalog, schema, name, table) in self.catalog_tables(access).await {
            builder
                .append(catalog, schema, name, table_type_name(table.table_type()), &table.schema())
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        builder.build().map_err(|e| Status::internal(e.to_string()))
    }

    /// Every table the caller may read (a restricted caller: its datasets, and not the
    /// `information_schema`, which lists every dataset).
    async fn catalog_tables(&self, access: &Access) -> Vec<(String, String, String, Arc<dyn TableProvider>)> {
        let ctx = self.engine.session();
        let mut out = Vec::new();
        for catalog_name in ctx.catalog_names() {
            let Some(catalog) = ctx.catalog(&catalog_name) else { continue };
            for schema_name in catalog.schema_names() {
                if access.is_restricted() && schema_name == "information_schema" {
                    continue;
                }
                let Some(schema) = catalog.schema(&schema_name) else { continue };
                for table_name in schema.table_names() {
                    let dataset = match schema_name == strata_core::engine::DEFAULT_SCHEMA {
                        true => table_name.clone(),
                        false => format!("{schema_name}.{table_name}"),
                    };
                    if !access.allows(&dataset) {
                        continue;
                    }
                    if let Ok(Some(table)) = schema.table(&table_name).await {
                        out.push((catalog_name.clone(), schema_name.clone(), table_name, table));
                    }
                }
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1, &a.2).cmp(&(&b.0, &b.1, &b.2)));
        out
    }
}

/// The table types DataFusion's catalog can hold.
pub(super) fn table_types() -> Result<RecordBatch, Status> {
    let types = arrow::array::StringArray::from(vec!["LOCAL TEMPORARY", "TABLE", "VIEW"]);
    RecordBatch::try_new(Arc::new(table_types_schema()), vec![Arc::new(types)])
        .map_err(|e| Status::internal(e.to_string()))
}

fn table_type_name(t: TableType) -> &'static str {
    match t {
        TableType::Base => "TABLE",
        TableType::View => "VIEW",
        TableType::Temporary => "LOCAL TEMPORARY",
    }
}

/// Schema of GetPrimaryKeys answers (Flight SQL spec).
pub(super) fn primary_keys_schema() -> Schema {
    Schema::new(vec![
        Field::new("catalog_name", DataType::Utf8, true),
        Field::new("db_schema_name", DataType::Utf8, true),
        Field::new("table_name", DataType::Utf8, false),
        Field::new("column_name", DataType::Utf8, false),
        Field::new("key_name", DataType::Utf8, true),
        Field::new("key_sequence", DataType::Int32, false),
    ])
}

/// Schema of GetExportedKeys / GetImportedKeys / GetCrossReference answers (Flight SQL spec).
pub(super) fn foreign_keys_schema() -> Schema {
    Schema::new(vec![
        Field::new("pk_catalog_name", DataType::Utf8, true),
        Field::new("pk_db_schema_name", DataType::Utf8, true),
        Field::new("pk_table_name", DataType::Utf8, false),
        Field::new("pk_column_name", DataType::Utf8, false),
        Field::new("fk_catalog_name", DataType::Utf8, true),
        Field::new("fk_db_schema_name", DataType::Utf8, true),
        Field::new("fk_table_name", DataType::Utf8, false),
        Field::new("fk_column_name", DataType::Utf8, false),
        Field::new("key_sequence", DataType::Int32, false),
        Field::new("fk_key_name", DataType::Utf8, true),
        Field::new("pk_key_name", DataType::Utf8, true),
        Field::new("update_rule", DataType::UInt8, false),
        Field::new("delete_rule", DataType::UInt8, false),
    ])
}

pub(super) fn table_types_schema() -> Schema {
    Schema::new(vec![Field::new("table_type", DataType::Utf8, false)])
}
