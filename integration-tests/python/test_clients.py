"""Real Flight SQL clients against a running platform-service.

Started by the Rust test `clients::python_flight_sql_clients`, which passes the server's
address in STRATA_FLIGHT_URI. The data are the sample datasets in examples/data.
"""

import json
import os

import adbc_driver_flightsql.dbapi as flight_sql
import pyarrow as pa
import pyarrow.flight as flight
import pytest

URI = os.environ["STRATA_FLIGHT_URI"]


@pytest.fixture()
def conn():
    with flight_sql.connect(URI) as connection:
        yield connection


def test_execute_goes_through_prepare(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) AS n, max(customer_id) AS top FROM customers")
        assert cur.fetchone() == (200, 200)
        assert [d[0] for d in cur.description] == ["n", "top"]


def test_parameters(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT name FROM customers WHERE customer_id = $1", parameters=(7,))
        assert cur.fetchall() == [("Customer 007",)]
        cur.execute(
            "SELECT count(*) FROM orders WHERE amount > $1 AND status = $2",
            parameters=(100.0, "paid"),
        )
        (count,) = cur.fetchone()
        cur.execute("SELECT count(*) FROM orders WHERE amount > 100.0 AND status = 'paid'")
        assert cur.fetchone() == (count,)


def test_the_drivers_own_qmark_parameter_style(conn):
    """ADBC's dbapi declares paramstyle 'qmark': `?` must work as written, numbered in order."""
    assert flight_sql.paramstyle == "qmark"
    with conn.cursor() as cur:
        cur.execute("SELECT order_id FROM orders WHERE order_id = ?", parameters=(7,))
        assert cur.fetchall() == [(7,)]
        cur.execute(
            "SELECT count(*) FROM orders WHERE amount > ? AND status = ?",
            parameters=(100.0, "paid"),
        )
        (count,) = cur.fetchone()
        cur.execute("SELECT count(*) FROM orders WHERE amount > 100.0 AND status = 'paid'")
        assert cur.fetchone() == (count,)
        # A `?` inside a string is text, not a placeholder.
        cur.execute("SELECT '?' AS q, name FROM customers WHERE customer_id = ?", parameters=(3,))
        assert cur.fetchall() == [("?", "Customer 003")]
        cur.executemany("SELECT name FROM customers WHERE customer_id = ?", [(1,), (2,)])
        assert cur.rowcount == 2


def test_executemany_runs_once_per_parameter_row(conn):
    with conn.cursor() as cur:
        cur.executemany("SELECT name FROM customers WHERE customer_id = $1", [(1,), (2,), (3,)])
        assert cur.rowcount == 3


def test_writes_are_refused_with_a_clear_error(conn):
    with conn.cursor() as cur:
        with pytest.raises(Exception, match="read-only"):
            cur.execute("DELETE FROM customers")


def test_get_info(conn):
    info = conn.adbc_get_info()
    assert info["vendor_name"] == "Strata"
    assert info["vendor_version"] == "0.1.0"
    assert info["vendor_arrow_version"] == "59"


def test_get_objects_down_to_columns(conn):
    objects = conn.adbc_get_objects(depth="all").read_all().to_pylist()
    catalogs = {c["catalog_name"]: c for c in objects}
    assert "strata" in catalogs
    schemas = {s["db_schema_name"]: s for s in catalogs["strata"]["catalog_db_schemas"]}
    tables = {t["table_name"]: t for t in schemas["public"]["db_schema_tables"]}
    assert {"customers", "orders"} <= set(tables)
    columns = [c["column_name"] for c in tables["customers"]["table_columns"]]
    assert columns == ["customer_id", "name", "region", "signup_date"]


def test_get_table_schema_and_types(conn):
    schema = conn.adbc_get_table_schema("orders")
    # DataFusion's NDJSON schema inference orders fields by name.
    assert sorted(schema.names) == ["amount", "customer_id", "order_id", "ordered_at", "status"]
    assert schema.field("amount").type == pa.float64()
    assert "TABLE" in conn.adbc_get_table_types()


def test_execute_schema_without_running(conn):
    with conn.cursor() as cur:
        schema = cur.adbc_execute_schema("SELECT customer_id, name FROM customers")
        assert schema.names == ["customer_id", "name"]
        assert schema.field("customer_id").type == pa.int64()


def test_error_then_good_query_on_the_same_connection(conn):
    with conn.cursor() as cur:
        with pytest.raises(Exception, match="no_such_table"):
            cur.execute("SELECT * FROM no_such_table")
        cur.execute("SELECT 1 AS one")
        assert cur.fetchone() == (1,)


def test_pyarrow_flight_json_ticket():
    client = flight.connect(URI)
    ticket = flight.Ticket(json.dumps({"sql": "SELECT region, count(*) AS n FROM customers GROUP BY region ORDER BY region"}).encode())
    table = client.do_get(ticket).read_all()
    assert table.column_names == ["region", "n"]
    assert sum(table.column("n").to_pylist()) == 200


def test_pyarrow_flight_list_and_path_descriptor():
    client = flight.connect(URI)
    names = {tuple(f.descriptor.path) for f in client.list_flights()}
    assert (b"orders",) in names or ("orders",) in names
    info = client.get_flight_info(flight.FlightDescriptor.for_path("customers"))
    table = client.do_get(info.endpoints[0].ticket).read_all()
    assert table.num_rows == 200


def test_grpc_reflection_lists_the_tier_service_and_calls_its_catalog():
    """A generic gRPC client with nothing compiled in: it learns the tier protocol from the
    server's reflection service, then calls ListDatasets."""
    import grpc
    from google.protobuf import message_factory
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    target = URI.removeprefix("grpc://")
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "strata.v1.TierService" in database.get_services()
        pool = DescriptorPool(database)
        method = pool.FindServiceByName("strata.v1.TierService").methods_by_name["ListDatasets"]
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        list_datasets = channel.unary_unary(
            "/strata.v1.TierService/ListDatasets",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        response = list_datasets(request_type())
    by_name = {d.name: d for d in response.datasets}
    assert sorted(by_name) == ["customers", "orders"]
    assert {d.home_region for d in response.datasets} == {"local"}
    assert by_name["orders"].accelerated and by_name["orders"].version >= 1
    assert by_name["orders"].rows == 2000
    assert not by_name["customers"].accelerated


def test_garbage_tier_protocol_messages_are_invalid_argument():
    """Bytes that are no strata.v1 message are the caller's error, not an internal one, and
    the server answers the next call."""
    import grpc

    target = URI.removeprefix("grpc://")
    with grpc.insecure_channel(target) as channel:
        for method in ["/strata.v1.TierService/Execute", "/strata.v1.TierService/Subscribe"]:
            call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as refused:
                list(call(b"\xff\xff\xff\xff\x0f garbage"))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
        ingest = channel.unary_unary("/strata.v1.TierService/Ingest", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as refused:
            ingest(b"\x0a\xff\xff\xff\xff\x0f")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
        health = channel.unary_unary("/strata.v1.TierService/Health", request_serializer=None, response_deserializer=None)
        assert health(b"") is not None
