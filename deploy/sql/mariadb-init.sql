-- Billing tables for deploy/compose.yaml, created on the container's first
-- start. The server runs with a ROW binlog (see the `command` in compose.yaml).

CREATE DATABASE IF NOT EXISTS billing;
USE billing;

CREATE TABLE invoices (
    id          bigint PRIMARY KEY,
    customer_id bigint,
    amount      decimal(12,2),
    status      varchar(20)
);

CREATE TABLE payments (
    id         bigint PRIMARY KEY,
    invoice_id bigint,
    amount     decimal(12,2)
);

-- A few rows, so the first start has entities to show.
INSERT INTO invoices (id, customer_id, amount, status) VALUES
    (1, 1, 120.00, 'paid'),
    (2, 1,  75.50, 'open'),
    (3, 2, 300.00, 'paid');

INSERT INTO payments (id, invoice_id, amount) VALUES
    (1, 1, 120.00),
    (2, 3, 300.00);
