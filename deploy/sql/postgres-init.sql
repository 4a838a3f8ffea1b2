-- CRM tables for deploy/compose.yaml, created in the `postgres` database
-- (schema public) on the container's first start.
-- Full replica identity makes updates and deletes carry the whole row, which
-- the postgres_cdc source checks for at start.

CREATE TABLE customers (
    id         bigint PRIMARY KEY,
    name       text,
    email      text,
    tier       text,
    updated_at timestamptz DEFAULT now()
);
ALTER TABLE customers REPLICA IDENTITY FULL;

CREATE TABLE addresses (
    id          bigint PRIMARY KEY,
    customer_id bigint,
    city        text,
    street      text
);
ALTER TABLE addresses REPLICA IDENTITY FULL;

-- A few rows, so the first start has entities to show.
INSERT INTO customers (id, name, email, tier) VALUES
    (1, 'Ada Lovelace',   'ada@example.com',   'gold'),
    (2, 'Alan Turing',    'alan@example.com',  'silver'),
    (3, 'Grace Hopper',   'grace@example.com', 'platinum');

INSERT INTO addresses (id, customer_id, city, street) VALUES
    (1, 1, 'London',    '12 St James''s Square'),
    (2, 2, 'Wilmslow',  '43 Adlington Road'),
    (3, 3, 'Arlington', '1 Navy Annex');
