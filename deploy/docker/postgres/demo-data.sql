-- The demo's source database (the compose demo and the k8s dev overlay), baked into the
-- strata-postgres image and run once by its entrypoint on an empty volume. Deterministic data
-- (no random()), so the smoke test can compare every tier's answer with PostgreSQL's own.
CREATE DATABASE shop;
\connect shop

CREATE TABLE customers (
  customer_id integer PRIMARY KEY,
  name        text NOT NULL,
  region      text NOT NULL,
  country     text NOT NULL
);
INSERT INTO customers
SELECT g, 'customer-' || g,
       CASE WHEN g % 3 = 0 THEN 'us' ELSE 'eu' END,
       CASE WHEN g % 3 = 0 THEN 'US' ELSE (ARRAY['DE', 'FR', 'NL', 'ES'])[1 + g % 4] END
FROM generate_series(1, 5000) AS g;

-- Enough orders that an aggregate is worth accelerating.
CREATE TABLE orders (
  order_id    bigint PRIMARY KEY,
  customer_id integer NOT NULL,
  product_id  integer NOT NULL,
  quantity    integer NOT NULL,
  amount      double precision NOT NULL,
  status      text NOT NULL,
  created_at  timestamp NOT NULL
);
INSERT INTO orders
SELECT g, 1 + (g * 7919) % 5000, 1 + g % 40, 1 + g % 5,
       round(((g % 997) * 1.37 + 5)::numeric, 2)::double precision,
       (ARRAY['new', 'paid', 'shipped', 'delivered', 'returned'])[1 + (g / 7) % 5],
       timestamp '2026-01-01' + (g * interval '37 seconds')
FROM generate_series(1, 200000) AS g;

-- Region us's shipments (homed on platform-us).
CREATE TABLE shipments (
  shipment_id bigint PRIMARY KEY,
  order_id    bigint NOT NULL,
  carrier     text NOT NULL,
  shipped_at  timestamp NOT NULL
);
INSERT INTO shipments
SELECT g, g * 3, (ARRAY['ups', 'fedex', 'usps'])[1 + g % 3], timestamp '2026-01-02' + (g * interval '1 minute')
FROM generate_series(1, 50000) AS g;

-- Sensor readings written at the edge (writable: the platform inserts uploaded batches here).
CREATE TABLE readings (
  device   text NOT NULL,
  seq      bigint NOT NULL,
  celsius  double precision NOT NULL
);
INSERT INTO readings
SELECT 'sensor-' || (g % 20), g, 15 + (g % 150) / 10.0
FROM generate_series(1, 1000) AS g;

-- The account the tiers read with: read access, and insert on the writable table.
CREATE ROLE strata LOGIN PASSWORD :'strata_password';
GRANT CONNECT ON DATABASE shop TO strata;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO strata;
GRANT INSERT ON readings TO strata;
-- The platform records applied edge batches in its own table (created on first use).
GRANT CREATE ON SCHEMA public TO strata;
