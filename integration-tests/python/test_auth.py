"""Real Flight SQL clients against a tier with `auth:` over TLS: each client's own way of
sending a key, verifying the tier's certificate against the test CA.

Started by the Rust test `auth::python_clients_connect_with_a_key_over_tls`, which passes the
server's address in STRATA_FLIGHT_URI (grpc+tls://), the CA certificate's file in
STRATA_CA_FILE, a key of a tenant granted `customers` only in STRATA_KEY, and an expired key
in STRATA_EXPIRED_KEY.
"""

import os

import adbc_driver_flightsql
import adbc_driver_flightsql.dbapi as flight_sql
import adbc_driver_manager
import pyarrow.flight as flight
import pytest

URI = os.environ["STRATA_FLIGHT_URI"]
KEY = os.environ["STRATA_KEY"]
EXPIRED = os.environ["STRATA_EXPIRED_KEY"]
AUTH_HEADER = adbc_driver_flightsql.DatabaseOptions.AUTHORIZATION_HEADER.value
ROOT_CERTS = adbc_driver_flightsql.DatabaseOptions.TLS_ROOT_CERTS.value
with open(os.environ["STRATA_CA_FILE"], "rb") as ca_file:
    CA = ca_file.read()


def adbc(**options):
    return flight_sql.connect(URI, db_kwargs={ROOT_CERTS: CA.decode(), **options})


def adbc_with_header(key):
    return adbc(**{AUTH_HEADER: f"Bearer {key}"})


def pyarrow_client():
    return flight.FlightClient(URI, tls_root_certs=CA)


def test_adbc_with_an_authorization_header():
    with adbc_with_header(KEY) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM customers WHERE customer_id = ?", parameters=(7,))
        assert cur.fetchone() == (1,)


def test_adbc_with_username_and_password_goes_through_the_handshake():
    with adbc(username="anyone", password=KEY) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM customers")
        assert cur.fetchone() == (200,)


@pytest.mark.parametrize("key", [None, "strata_not_a_key", EXPIRED])
def test_adbc_without_a_valid_key_is_refused(key):
    with pytest.raises(adbc_driver_manager.Error) as refused:
        conn = adbc() if key is None else adbc_with_header(key)
        with conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
    text = str(refused.value)
    assert "UNAUTHENTICATED" in text or "Unauthenticated" in text, text
    assert "expired" not in text.lower(), text


def test_adbc_lists_only_the_tenants_datasets():
    with adbc_with_header(KEY) as conn:
        objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        tables = {
            t["table_name"]
            for catalog in objects
            for schema in catalog["catalog_db_schemas"] or []
            for t in schema["db_schema_tables"] or []
        }
        assert tables == {"customers"}, tables


def test_adbc_another_tenants_dataset_is_unknown():
    with adbc_with_header(KEY) as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as hidden:
            cur.execute("SELECT * FROM orders")
        with pytest.raises(adbc_driver_manager.Error) as missing:
            cur.execute("SELECT * FROM no_such_table")
    assert str(hidden.value).replace("orders", "X") == str(missing.value).replace("no_such_table", "X")


def test_adbc_refuses_a_tier_whose_certificate_it_cannot_verify():
    with pytest.raises(adbc_driver_manager.Error):
        conn = flight_sql.connect(URI, db_kwargs={AUTH_HEADER: f"Bearer {KEY}"})
        with conn, conn.cursor() as cur:
            cur.execute("SELECT 1")


def test_pyarrow_basic_token_then_bearer():
    client = pyarrow_client()
    header = client.authenticate_basic_token(b"anyone", KEY.encode())
    options = flight.FlightCallOptions(headers=[header])
    reader = client.do_get(flight.Ticket(b'{"sql": "SELECT count(*) AS n FROM customers"}'), options)
    assert reader.read_all().to_pylist() == [{"n": 200}]


def test_pyarrow_without_a_key_is_refused():
    client = pyarrow_client()
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.do_get(flight.Ticket(b'{"sql": "SELECT 1"}')).read_all()
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.authenticate_basic_token(b"anyone", b"strata_not_a_key")
