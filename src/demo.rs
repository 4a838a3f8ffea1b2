//! The demo data set: three SQLite databases (`crm.db`, `billing.db`,
//! `support.db`) seeded with realistic, deterministic customers, and a
//! mutator that keeps committing random business transactions against them.
//!
//! Invariants:
//! - A database under its final name is complete: it is built under a
//!   temporary name, in one transaction, and renamed into place.
//! - The seed depends only on the customer count (fixed RNG seed, fixed base
//!   date), so a missing database is recreated consistent with the others.
//! - Customers and invoices are never deleted; every row the mutator writes
//!   references a parent that exists when it is written.
//! - Every file is in WAL mode and every connection waits on locks (busy
//!   timeout), so the mutator coexists with the fabric reading the files.

use anyhow::Context;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Connection};
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub const CRM_DB: &str = "crm.db";
pub const BILLING_DB: &str = "billing.db";
pub const SUPPORT_DB: &str = "support.db";

const CRM_SCHEMA: &str = "\
    CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL, \
        tier TEXT NOT NULL, created_at TIMESTAMP NOT NULL);
    CREATE TABLE addresses(id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, \
        kind TEXT NOT NULL, street TEXT, city TEXT, country TEXT);
    CREATE INDEX addresses_customer_id ON addresses(customer_id);";
const BILLING_SCHEMA: &str = "\
    CREATE TABLE invoices(id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, \
        amount DECIMAL(12,2) NOT NULL, currency TEXT NOT NULL, status TEXT NOT NULL, \
        issued_on DATE NOT NULL);
    CREATE INDEX invoices_customer_id ON invoices(customer_id);
    CREATE TABLE payments(id INTEGER PRIMARY KEY, invoice_id INTEGER NOT NULL, \
        amount DECIMAL(12,2) NOT NULL, method TEXT NOT NULL, paid_at TIMESTAMP NOT NULL);
    CREATE INDEX payments_invoice_id ON payments(invoice_id);";
const SUPPORT_SCHEMA: &str = "\
    CREATE TABLE tickets(id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, \
        subject TEXT NOT NULL, status TEXT NOT NULL, priority TEXT NOT NULL, \
        opened_at TIMESTAMP NOT NULL);
    CREATE INDEX tickets_customer_id ON tickets(customer_id);";

const FIRST_NAMES: &str = "Ada Alan Amara Anna Arjun Ben Carla Chen Daniel Elena Emma Farah Felix \
    Grace Hana Hugo Ines Ivan Jonas Julia Kenji Lara Leo Lina Marco Maya Mila Nadia Noah Olga \
    Omar Paula Priya Rafael Sara Sofia Tariq Tom Yara Zoe";
const LAST_NAMES: &str = "Almeida Andersen Bauer Becker Costa Dubois Eriksson Fischer Garcia \
    Hansen Ibrahim Jansen Kowalski Larsen Lopez Martin Meyer Moreau Nakamura Novak Okafor Olsen \
    Patel Petrov Quinn Rossi Santos Schmidt Silva Smith Tanaka Varga Walsh Weber Yilmaz Zhang";
/// `city:country:currency`.
const CITIES: &str = "Paris:France:EUR Lyon:France:EUR Berlin:Germany:EUR Munich:Germany:EUR \
    Madrid:Spain:EUR Lisbon:Portugal:EUR Rome:Italy:EUR Milan:Italy:EUR Amsterdam:Netherlands:EUR \
    Vienna:Austria:EUR Dublin:Ireland:EUR London:United_Kingdom:GBP Manchester:United_Kingdom:GBP \
    Zurich:Switzerland:CHF Stockholm:Sweden:SEK Oslo:Norway:NOK Copenhagen:Denmark:DKK \
    Warsaw:Poland:PLN New_York:United_States:USD Chicago:United_States:USD Toronto:Canada:CAD \
    Tokyo:Japan:JPY Sydney:Australia:AUD";
const STREETS: &str = "Main_Street Station_Road Church_Lane Park_Avenue High_Street Mill_Road \
    Market_Square River_Walk Oak_Street Harbour_View Elm_Grove King_Street";
const DOMAINS: &[&str] = &["example.com", "example.org", "example.net", "mail.example"];
const TIERS: &[(&str, u32)] = &[
    ("bronze", 50),
    ("silver", 30),
    ("gold", 15),
    ("platinum", 5),
];
const METHODS: &[&str] = &["card", "card", "bank_transfer", "paypal", "direct_debit"];
const PRIORITIES: &[&str] = &["low", "normal", "normal", "high", "urgent"];
/// `|`-separated.
const SUBJECTS: &str = "Cannot log in|Invoice looks wrong|Change of address|Refund request|\
    Delivery is late|Upgrade my plan|Password reset does not arrive|Question about VAT|\
    Cancel my subscription|App crashes on start";
/// 2022-01-01T00:00:00Z: seed dates are relative to it, so the seed never changes.
const SEED_EPOCH: i64 = 1_640_995_200;
const DAY: i64 = 86_400;

fn words(s: &'static str) -> Vec<String> {
    s.split_whitespace().map(|w| w.replace('_', " ")).collect()
}

fn weighted<'a>(rng: &mut fastrand::Rng, items: &[(&'a str, u32)]) -> &'a str {
    let mut n = rng.u32(0..items.iter().map(|(_, w)| w).sum::<u32>());
    for (item, w) in items {
        if n < *w {
            return item;
        }
        n -= w;
    }
    items[0].0
}

fn timestamp(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .unwrap_or_default()
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

fn date(secs: i64) -> String {
    timestamp(secs)[..10].to_string()
}

fn money(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// One cell of a seed row.
enum Cell {
    I(i64),
    T(String),
}

impl From<i64> for Cell {
    fn from(i: i64) -> Self {
        Cell::I(i)
    }
}

impl From<String> for Cell {
    fn from(s: String) -> Self {
        Cell::T(s)
    }
}

impl From<&str> for Cell {
    fn from(s: &str) -> Self {
        Cell::T(s.to_string())
    }
}

macro_rules! row {
    ($($v:expr),* $(,)?) => { vec![$(Cell::from($v)),*] };
}

/// Shared vocabulary of seed and mutator.
struct Vocab {
    first: Vec<String>,
    last: Vec<String>,
    /// (city, country, currency)
    cities: Vec<(String, String, String)>,
    streets: Vec<String>,
    subjects: Vec<&'static str>,
}

impl Vocab {
    fn new() -> Self {
        let cities = words(CITIES)
            .iter()
            .filter_map(|c| {
                let mut p = c.split(':');
                Some((p.next()?.into(), p.next()?.into(), p.next()?.into()))
            })
            .collect();
        Vocab {
            first: words(FIRST_NAMES),
            last: words(LAST_NAMES),
            cities,
            streets: words(STREETS),
            subjects: SUBJECTS.split('|').collect(),
        }
    }

    fn customer(&self, rng: &mut fastrand::Rng, id: i64) -> (String, String) {
        let first = &self.first[rng.usize(..self.first.len())];
        let last = &self.last[rng.usize(..self.last.len())];
        let domain = DOMAINS[rng.usize(..DOMAINS.len())];
        let email = format!(
            "{}.{}{id}@{domain}",
            first.to_lowercase(),
            last.to_lowercase()
        );
        (format!("{first} {last}"), email)
    }

    fn address(&self, rng: &mut fastrand::Rng) -> (String, &(String, String, String)) {
        let street = &self.streets[rng.usize(..self.streets.len())];
        let street = format!("{} {street}", rng.u32(1..250));
        (street, &self.cities[rng.usize(..self.cities.len())])
    }
}

/// The seed rows of every table.
#[derive(Default)]
struct Seed {
    customers: Vec<Vec<Cell>>,
    addresses: Vec<Vec<Cell>>,
    invoices: Vec<Vec<Cell>>,
    payments: Vec<Vec<Cell>>,
    tickets: Vec<Vec<Cell>>,
}

fn generate(customers: u32) -> Seed {
    let mut rng = fastrand::Rng::with_seed(0x00fa_b41c);
    let v = Vocab::new();
    let mut s = Seed::default();
    for id in 1..=i64::from(customers) {
        let (name, email) = v.customer(&mut rng, id);
        let created = SEED_EPOCH + rng.i64(0..3 * 365 * DAY);
        let tier = weighted(&mut rng, TIERS);
        s.customers
            .push(row![id, name, email, tier, timestamp(created)]);
        let mut currency = "EUR".to_string();
        for kind in ["billing", "shipping"].iter().take(rng.usize(1..=2)) {
            let (street, (city, country, cur)) = v.address(&mut rng);
            if *kind == "billing" {
                currency = cur.clone();
            }
            let aid = s.addresses.len() as i64 + 1;
            s.addresses.push(row![
                aid,
                id,
                *kind,
                street,
                city.as_str(),
                country.as_str()
            ]);
        }
        for _ in 0..rng.usize(0..=6) {
            let issued = created + rng.i64(0..365 * DAY);
            let cents = rng.i64(1_000..250_000);
            let paid = rng.usize(0..=2);
            let status = match paid {
                0 if rng.u8(0..4) == 0 => "overdue",
                0 => "open",
                _ => "paid",
            };
            let iid = s.invoices.len() as i64 + 1;
            s.invoices.push(row![
                iid,
                id,
                money(cents),
                currency.as_str(),
                status,
                date(issued)
            ]);
            let first = if paid == 2 {
                cents * rng.i64(20..80) / 100
            } else {
                cents
            };
            for part in [first, cents - first].into_iter().take(paid) {
                let pid = s.payments.len() as i64 + 1;
                let at = timestamp(issued + rng.i64(DAY..30 * DAY));
                let method = METHODS[rng.usize(..METHODS.len())];
                s.payments.push(row![pid, iid, money(part), method, at]);
            }
        }
        for _ in 0..rng.usize(0..=4) {
            let tid = s.tickets.len() as i64 + 1;
            let subject = v.subjects[rng.usize(..v.subjects.len())];
            let status = weighted(&mut rng, &[("closed", 6), ("open", 3), ("pending", 1)]);
            let priority = PRIORITIES[rng.usize(..PRIORITIES.len())];
            let opened = timestamp(created + rng.i64(0..700 * DAY));
            s.tickets
                .push(row![tid, id, subject, status, priority, opened]);
        }
    }
    s
}

/// Inserts whole rows in multi-row statements: far fewer round trips than one per row.
async fn insert_rows(
    conn: &mut SqliteConnection,
    table: &str,
    rows: &[Vec<Cell>],
) -> sqlx::Result<()> {
    let width = rows.first().map_or(1, Vec::len);
    let one = format!("({})", vec!["?"; width].join(", "));
    for chunk in rows.chunks(900 / width) {
        let values = vec![one.as_str(); chunk.len()].join(", ");
        let sql = format!("INSERT INTO {table} VALUES {values}");
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for cell in chunk.iter().flatten() {
            q = match cell {
                Cell::I(i) => q.bind(*i),
                Cell::T(s) => q.bind(s.clone()),
            };
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Builds one database under a temporary name and renames it into place.
async fn create(
    path: &Path,
    schema: &'static str,
    tables: &[(&str, &[Vec<Cell>])],
) -> anyhow::Result<()> {
    let tmp = path.with_extension("db.creating");
    for p in [tmp.clone(), tmp.with_extension("creating-journal")] {
        if tokio::fs::try_exists(&p).await? {
            tokio::fs::remove_file(&p).await?;
        }
    }
    // A rollback journal while building: no WAL file may stay behind the rename.
    let opts = SqliteConnectOptions::new()
        .filename(&tmp)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Delete)
        .synchronous(SqliteSynchronous::Off);
    let mut conn = SqliteConnection::connect_with(&opts).await?;
    let mut tx = conn.begin().await?;
    sqlx::raw_sql(schema).execute(&mut *tx).await?;
    for (table, rows) in tables {
        insert_rows(&mut tx, table, rows).await?;
    }
    tx.commit().await?;
    conn.close().await?;
    tokio::fs::rename(&tmp, path).await?;
    // WAL mode is stored in the file; switch now that it is in place.
    open(path).await?.close().await?;
    Ok(())
}

async fn open(path: &Path) -> sqlx::Result<SqliteConnection> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(false)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(5));
    SqliteConnection::connect_with(&opts).await
}

/// Creates the three databases in `dir` with `customers` customers if they do not exist yet; returns true if created.
pub async fn ensure(dir: &Path, customers: u32) -> anyhow::Result<bool> {
    tokio::fs::create_dir_all(dir)
        .await
        .with_context(|| format!("cannot create the demo directory {}", dir.display()))?;
    let mut missing = Vec::new();
    for db in [CRM_DB, BILLING_DB, SUPPORT_DB] {
        if !tokio::fs::try_exists(dir.join(db)).await? {
            missing.push(db);
        }
    }
    if missing.is_empty() {
        return Ok(false);
    }
    let started = std::time::Instant::now();
    let s = generate(customers);
    for db in &missing {
        let (schema, tables): (_, Vec<(_, &[_])>) = match *db {
            CRM_DB => (
                CRM_SCHEMA,
                vec![("customers", &s.customers), ("addresses", &s.addresses)],
            ),
            BILLING_DB => (
                BILLING_SCHEMA,
                vec![("invoices", &s.invoices), ("payments", &s.payments)],
            ),
            _ => (SUPPORT_SCHEMA, vec![("tickets", &s.tickets)]),
        };
        let path = dir.join(db);
        create(&path, schema, &tables)
            .await
            .with_context(|| format!("cannot create the demo database {}", path.display()))?;
    }
    tracing::info!(
        dir = %dir.display(),
        customers,
        databases = ?missing,
        millis = started.elapsed().as_millis() as u64,
        "demo databases created"
    );
    Ok(true)
}

/// Commits `rate` random source transactions per second across the three databases until `shutdown` fires. Returns the count committed.
pub async fn mutate(dir: &Path, rate: f64, shutdown: CancellationToken) -> anyhow::Result<u64> {
    if rate.is_nan() || rate <= 0.0 {
        shutdown.cancelled().await;
        return Ok(0);
    }
    let mut m = Mutator::open(dir).await?;
    // Clamped: a tiny rate must not overflow the timer, a huge one not spin.
    let period = Duration::try_from_secs_f64(1.0 / rate).unwrap_or(Duration::MAX);
    let period = period.clamp(Duration::from_micros(10), Duration::from_secs(86_400));
    let mut tick = tokio::time::interval(period);
    let (mut count, mut failures) = (0u64, 0u32);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        match m.step().await {
            Ok(()) => {
                count += 1;
                failures = 0;
                if count.is_multiple_of(1000) {
                    tracing::debug!(count, "demo transactions committed");
                }
            }
            // A busy or briefly unavailable file is retried; a lasting failure ends the mutator.
            Err(e) if failures < 20 => {
                failures += 1;
                tracing::warn!(error = %e, "demo transaction failed");
            }
            Err(e) => return Err(anyhow::Error::from(e).context("the demo mutator keeps failing")),
        }
    }
    Ok(count)
}

struct Mutator {
    crm: SqliteConnection,
    billing: SqliteConnection,
    support: SqliteConnection,
    rng: fastrand::Rng,
    vocab: Vocab,
}

fn now() -> String {
    timestamp(chrono::Utc::now().timestamp())
}

/// Runs one statement with positional arguments.
async fn exec(conn: &mut SqliteConnection, sql: &'static str, args: Vec<Cell>) -> sqlx::Result<()> {
    let mut q = sqlx::query(sql);
    for a in args {
        q = match a {
            Cell::I(i) => q.bind(i),
            Cell::T(s) => q.bind(s),
        };
    }
    q.execute(conn).await.map(drop)
}

/// A random existing row of `table` matching `filter`, if any.
async fn pick(
    conn: &mut SqliteConnection,
    rng: &mut fastrand::Rng,
    table: &str,
    filter: &str,
) -> sqlx::Result<Option<i64>> {
    let max_sql = format!("SELECT COALESCE(MAX(id), 0) FROM {table}");
    let max: i64 = sqlx::query_scalar(AssertSqlSafe(max_sql))
        .fetch_one(&mut *conn)
        .await?;
    if max == 0 {
        return Ok(None);
    }
    // From a random id upwards, else from the start: cheap on the primary key.
    let sql = format!("SELECT id FROM {table} WHERE ({filter}) AND id >= ?1 ORDER BY id LIMIT 1");
    for from in [rng.i64(1..=max), 0] {
        let q = sqlx::query_scalar(AssertSqlSafe(sql.clone())).bind(from);
        if let Some(id) = q.fetch_optional(&mut *conn).await? {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

impl Mutator {
    async fn open(dir: &Path) -> anyhow::Result<Self> {
        let open_db = async |db: &str| {
            let path = dir.join(db);
            let c = open(&path).await;
            c.with_context(|| format!("cannot open the demo database {}", path.display()))
        };
        Ok(Mutator {
            crm: open_db(CRM_DB).await?,
            billing: open_db(BILLING_DB).await?,
            support: open_db(SUPPORT_DB).await?,
            rng: fastrand::Rng::new(),
            vocab: Vocab::new(),
        })
    }

    /// Commits one random transaction.
    async fn step(&mut self) -> sqlx::Result<()> {
        match self.rng.u32(0..100) {
            0..15 => self.update_customer().await,
            15..30 => self.change_address().await,
            30..50 => self.add_invoice().await,
            50..65 => self.settle_invoice().await,
            65..70 => self.refund_payment().await,
            70..90 => self.ticket().await,
            _ => self.add_customer().await,
        }
    }

    fn any<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.rng.usize(..items.len())]
    }

    async fn customer(&mut self) -> sqlx::Result<Option<i64>> {
        pick(&mut self.crm, &mut self.rng, "customers", "1").await
    }

    async fn update_customer(&mut self) -> sqlx::Result<()> {
        let Some(id) = self.customer().await? else {
            return self.add_customer().await;
        };
        if self.rng.bool() {
            let tier = weighted(&mut self.rng, TIERS);
            exec(
                &mut self.crm,
                "UPDATE customers SET tier = ?2 WHERE id = ?1",
                row![id, tier],
            )
            .await
        } else {
            let sql = "UPDATE customers SET email = lower(replace(name, ' ', '.')) || id || '@' || ?2 WHERE id = ?1";
            let domain = self.any(DOMAINS);
            exec(&mut self.crm, sql, row![id, domain]).await
        }
    }

    /// Adds (40%), moves (40%) or deletes (20%) an address.
    async fn change_address(&mut self) -> sqlx::Result<()> {
        let (street, (city, country, _)) = self.vocab.address(&mut self.rng);
        let (city, country) = (city.clone(), country.clone());
        let n = self.rng.u8(0..10);
        let (id, sql) = match n {
            0..4 => (
                self.customer().await?,
                "INSERT INTO addresses(customer_id, kind, street, city, country) \
                 VALUES (?1, 'shipping', ?2, ?3, ?4)",
            ),
            4..8 => (
                pick(&mut self.crm, &mut self.rng, "addresses", "1").await?,
                "UPDATE addresses SET street = ?2, city = ?3, country = ?4 WHERE id = ?1",
            ),
            _ => (
                pick(&mut self.crm, &mut self.rng, "addresses", "1").await?,
                "DELETE FROM addresses WHERE id = ?1",
            ),
        };
        let Some(id) = id else { return Ok(()) };
        let args = if n < 8 {
            row![id, street, city, country]
        } else {
            row![id]
        };
        exec(&mut self.crm, sql, args).await
    }

    async fn add_invoice(&mut self) -> sqlx::Result<()> {
        let Some(cid) = self.customer().await? else {
            return Ok(());
        };
        // Invoiced in the currency of the customer's first address.
        let sql = "SELECT country FROM addresses WHERE customer_id = ?1 ORDER BY id LIMIT 1";
        let country: Option<String> = sqlx::query_scalar(sql)
            .bind(cid)
            .fetch_optional(&mut self.crm)
            .await?;
        let currency = country
            .and_then(|c| self.vocab.cities.iter().find(|x| x.1 == c))
            .map_or("EUR".to_string(), |x| x.2.clone());
        let sql = "INSERT INTO invoices(customer_id, amount, currency, status, issued_on) \
                   VALUES (?1, ?2, ?3, 'open', ?4)";
        let amount = money(self.rng.i64(1_000..250_000));
        exec(
            &mut self.billing,
            sql,
            row![cid, amount, currency, &now()[..10]],
        )
        .await
    }

    /// Pays what is left of an unpaid invoice and marks it paid, in one
    /// transaction; sometimes marks it overdue instead.
    async fn settle_invoice(&mut self) -> sqlx::Result<()> {
        let method = self.any(METHODS);
        let mut tx = self.billing.begin_with("BEGIN IMMEDIATE").await?;
        let Some(id) = pick(&mut tx, &mut self.rng, "invoices", "status != 'paid'").await? else {
            drop(tx);
            return self.add_invoice().await;
        };
        if self.rng.u8(0..5) == 0 {
            exec(
                &mut tx,
                "UPDATE invoices SET status = 'overdue' WHERE id = ?1",
                row![id],
            )
            .await?;
            return tx.commit().await;
        }
        let pay = "INSERT INTO payments(invoice_id, amount, method, paid_at) \
                   SELECT id, printf('%.2f', rest), ?2, ?3 FROM (SELECT id, amount - \
                   COALESCE((SELECT SUM(amount) FROM payments WHERE invoice_id = ?1), 0) AS rest \
                   FROM invoices WHERE id = ?1) WHERE rest > 0.004";
        exec(&mut tx, pay, row![id, method, now()]).await?;
        exec(
            &mut tx,
            "UPDATE invoices SET status = 'paid' WHERE id = ?1",
            row![id],
        )
        .await?;
        tx.commit().await
    }

    /// Deletes a payment and reopens its invoice, in one transaction.
    async fn refund_payment(&mut self) -> sqlx::Result<()> {
        let mut tx = self.billing.begin_with("BEGIN IMMEDIATE").await?;
        let Some(id) = pick(&mut tx, &mut self.rng, "payments", "1").await? else {
            return tx.commit().await;
        };
        let reopen = "UPDATE invoices SET status = 'open' \
                      WHERE id = (SELECT invoice_id FROM payments WHERE id = ?1)";
        exec(&mut tx, reopen, row![id]).await?;
        exec(&mut tx, "DELETE FROM payments WHERE id = ?1", row![id]).await?;
        tx.commit().await
    }

    /// Opens (40%), updates (35%) or closes (25%) a ticket.
    async fn ticket(&mut self) -> sqlx::Result<()> {
        let (n, priority) = (self.rng.u8(0..20), self.any(PRIORITIES));
        let open = "status != 'closed'";
        let picked = match n {
            0..8 => None,
            _ => pick(&mut self.support, &mut self.rng, "tickets", open).await?,
        };
        let Some(id) = picked else {
            let Some(cid) = self.customer().await? else {
                return Ok(());
            };
            let sql = "INSERT INTO tickets(customer_id, subject, status, priority, opened_at) \
                       VALUES (?1, ?2, 'open', ?3, ?4)";
            let subject = self.vocab.subjects[self.rng.usize(..self.vocab.subjects.len())];
            return exec(&mut self.support, sql, row![cid, subject, priority, now()]).await;
        };
        let (sql, args) = match n {
            8..15 => (
                "UPDATE tickets SET status = 'pending', priority = ?2 WHERE id = ?1",
                row![id, priority],
            ),
            _ => (
                "UPDATE tickets SET status = 'closed' WHERE id = ?1",
                row![id],
            ),
        };
        exec(&mut self.support, sql, args).await
    }

    /// A new customer (id max + 1) with a billing address, in one transaction.
    async fn add_customer(&mut self) -> sqlx::Result<()> {
        let mut tx = self.crm.begin_with("BEGIN IMMEDIATE").await?;
        let next = "SELECT COALESCE(MAX(id), 0) + 1 FROM customers";
        let id: i64 = sqlx::query_scalar(next).fetch_one(&mut *tx).await?;
        let (name, email) = self.vocab.customer(&mut self.rng, id);
        let sql = "INSERT INTO customers(id, name, email, tier, created_at) \
                   VALUES (?1, ?2, ?3, 'bronze', ?4)";
        exec(&mut tx, sql, row![id, name, email, now()]).await?;
        let (street, (city, country, _)) = self.vocab.address(&mut self.rng);
        let sql = "INSERT INTO addresses(customer_id, kind, street, city, country) \
                   VALUES (?1, 'billing', ?2, ?3, ?4)";
        exec(
            &mut tx,
            sql,
            row![id, street, city.as_str(), country.as_str()],
        )
        .await?;
        tx.commit().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn scalar(conn: &mut SqliteConnection, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(conn).await.unwrap()
    }

    const ORPHANS: &str =
        "SELECT COUNT(*) FROM payments WHERE invoice_id NOT IN (SELECT id FROM invoices)";
    const INVOICES: &str =
        "SELECT group_concat(id || customer_id || amount || status, ',') FROM invoices";

    #[tokio::test]
    async fn ensure_creates_complete_deterministic_databases_once() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("demo");
        let started = std::time::Instant::now();
        assert!(ensure(&d, 2000).await.unwrap());
        eprintln!("2000 customers in {:?}", started.elapsed());
        assert!(!ensure(&d, 2000).await.unwrap());
        let mut crm = open(&d.join(CRM_DB)).await.unwrap();
        assert_eq!(
            scalar(&mut crm, "SELECT COUNT(*) FROM customers").await,
            2000
        );
        let addresses = scalar(&mut crm, "SELECT COUNT(*) FROM addresses").await;
        assert!((2000..=4000).contains(&addresses), "{addresses}");
        let per_customer = "SELECT COUNT(*) FROM customers c WHERE NOT EXISTS \
            (SELECT 1 FROM addresses a WHERE a.customer_id = c.id)";
        assert_eq!(scalar(&mut crm, per_customer).await, 0);
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut crm)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let mut billing = open(&d.join(BILLING_DB)).await.unwrap();
        assert!(scalar(&mut billing, "SELECT COUNT(*) FROM payments").await > 1000);
        assert_eq!(scalar(&mut billing, ORPHANS).await, 0);
        let invoices: String = sqlx::query_scalar(INVOICES)
            .fetch_one(&mut billing)
            .await
            .unwrap();
        billing.close().await.unwrap();
        let mut support = open(&d.join(SUPPORT_DB)).await.unwrap();
        assert!(scalar(&mut support, "SELECT COUNT(*) FROM tickets").await > 1000);
        // A lost database is recreated with the same rows.
        std::fs::remove_file(d.join(BILLING_DB)).unwrap();
        assert!(ensure(&d, 2000).await.unwrap());
        let mut billing = open(&d.join(BILLING_DB)).await.unwrap();
        let again: String = sqlx::query_scalar(INVOICES)
            .fetch_one(&mut billing)
            .await
            .unwrap();
        assert_eq!(invoices, again);
        let leftovers = std::fs::read_dir(&d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("creating")
            })
            .count();
        assert_eq!(leftovers, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mutate_commits_transactions_and_keeps_the_databases_sound() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        ensure(&d, 200).await.unwrap();
        let stop = CancellationToken::new();
        let task = {
            let (d, stop) = (d.clone(), stop.clone());
            tokio::spawn(async move { mutate(&d, 200.0, stop).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.cancel();
        let n = task.await.unwrap().unwrap();
        assert!(n > 10, "{n} transactions");
        let mut crm = open(&d.join(CRM_DB)).await.unwrap();
        assert!(scalar(&mut crm, "SELECT COUNT(*) FROM customers").await >= 200);
        let orphans =
            "SELECT COUNT(*) FROM addresses WHERE customer_id NOT IN (SELECT id FROM customers)";
        assert_eq!(scalar(&mut crm, orphans).await, 0);
        let mut billing = open(&d.join(BILLING_DB)).await.unwrap();
        assert_eq!(scalar(&mut billing, ORPHANS).await, 0);
        for mut c in [crm, billing, open(&d.join(SUPPORT_DB)).await.unwrap()] {
            let ok: String = sqlx::query_scalar("PRAGMA integrity_check")
                .fetch_one(&mut c)
                .await
                .unwrap();
            assert_eq!(ok, "ok");
        }
    }

    #[tokio::test]
    async fn zero_rate_waits_for_shutdown() {
        let stop = CancellationToken::new();
        let stop2 = stop.clone();
        let task = tokio::spawn(async move { mutate(Path::new("/nonexistent"), 0.0, stop2).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!task.is_finished());
        stop.cancel();
        assert_eq!(task.await.unwrap().unwrap(), 0);
    }
}
