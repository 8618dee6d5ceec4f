//! A zbugs-like demo dataset (users, issues, comments, labels, issue labels), generated inside
//! Postgres so that even the benchmark scale loads in seconds. Deterministic: the same scale
//! always gives the same rows.

/// How many rows of each table to generate.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Users.
    pub users: u32,
    /// Issues.
    pub issues: u32,
    /// Comments.
    pub comments: u32,
    /// Labels.
    pub labels: u32,
    /// Issue labels.
    pub issue_labels: u32,
}

impl Scale {
    /// The benchmark dataset: 1,000 users, 100,000 issues, 500,000 comments, 20 labels and
    /// 150,000 issue labels.
    pub const BENCH: Scale = Scale {
        users: 1_000,
        issues: 100_000,
        comments: 500_000,
        labels: 20,
        issue_labels: 150_000,
    };

    /// A small dataset for `zero-cache-dev`.
    pub const DEV: Scale = Scale {
        users: 50,
        issues: 1_000,
        comments: 5_000,
        labels: 10,
        issue_labels: 1_500,
    };
}

/// The demo tables.
pub const SCHEMA_SQL: &str = r#"
CREATE TABLE IF NOT EXISTS "user" (
  id TEXT PRIMARY KEY, login TEXT NOT NULL, name TEXT, avatar TEXT, role TEXT NOT NULL DEFAULT 'user');
CREATE TABLE IF NOT EXISTS issue (
  id TEXT PRIMARY KEY, "shortID" INTEGER, title TEXT NOT NULL, open BOOLEAN NOT NULL,
  modified DOUBLE PRECISION NOT NULL, created DOUBLE PRECISION NOT NULL,
  "creatorID" TEXT NOT NULL REFERENCES "user"(id), "assigneeID" TEXT REFERENCES "user"(id),
  description TEXT DEFAULT '', visibility TEXT NOT NULL DEFAULT 'public');
CREATE INDEX IF NOT EXISTS issue_modified_idx ON issue (modified);
CREATE INDEX IF NOT EXISTS issue_created_idx ON issue (created);
CREATE INDEX IF NOT EXISTS issue_open_modified_idx ON issue (open, modified);
CREATE TABLE IF NOT EXISTS comment (
  id TEXT PRIMARY KEY, "issueID" TEXT NOT NULL REFERENCES issue(id) ON DELETE CASCADE,
  created DOUBLE PRECISION NOT NULL, body TEXT NOT NULL, "creatorID" TEXT NOT NULL REFERENCES "user"(id));
CREATE INDEX IF NOT EXISTS comment_issue_created_idx ON comment ("issueID", created);
CREATE TABLE IF NOT EXISTS label (id TEXT PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS "issueLabel" (
  "labelID" TEXT NOT NULL REFERENCES label(id), "issueID" TEXT NOT NULL REFERENCES issue(id) ON DELETE CASCADE,
  PRIMARY KEY ("labelID", "issueID"));
CREATE INDEX IF NOT EXISTS issuelabel_issue_idx ON "issueLabel" ("issueID");
"#;

/// SQL that fills the demo tables at `scale`. Pseudo-random choices come from hashing the row
/// number, so the data is the same on every run.
pub fn data_sql(s: Scale) -> String {
    format!(
        r#"
INSERT INTO "user" (id, login, name, avatar, role)
  SELECT 'u' || g, 'user' || g, 'User ' || g, 'https://example.com/a/' || g || '.png',
         CASE WHEN g % 50 = 0 THEN 'crew' ELSE 'user' END
  FROM generate_series(1, {users}) g;
INSERT INTO label (id, name)
  SELECT 'l' || g, (ARRAY['bug','feature','docs','perf','ui','backend','zql','sync','infra','test',
                          'p0','p1','p2','help','question','wontfix','dup','good-first','security','release'])[1 + (g - 1) % 20]
                   || CASE WHEN g > 20 THEN '-' || g ELSE '' END
  FROM generate_series(1, {labels}) g;
INSERT INTO issue (id, "shortID", title, open, modified, created, "creatorID", "assigneeID", description)
  SELECT 'i' || g, g, 'Issue ' || g || ': ' || md5(g::text),
         (hashint4(g) % 3) <> 0,
         1700000000000 + (abs(hashint4(g * 7)) % 10000000)::float8 * 1000,
         1690000000000 + g::float8 * 60000,
         'u' || (1 + abs(hashint4(g)) % {users}),
         CASE WHEN g % 4 = 0 THEN NULL ELSE 'u' || (1 + abs(hashint4(g + 1)) % {users}) END,
         repeat(md5((g * 3)::text), 2)
  FROM generate_series(1, {issues}) g;
INSERT INTO comment (id, "issueID", created, body, "creatorID")
  SELECT 'c' || g, 'i' || (1 + abs(hashint4(g)) % {issues}),
         1690000000000 + g::float8 * 1000,
         'Comment ' || g || ' ' || md5(g::text),
         'u' || (1 + abs(hashint4(g * 13)) % {users})
  FROM generate_series(1, {comments}) g;
INSERT INTO "issueLabel" ("labelID", "issueID")
  SELECT 'l' || (1 + (abs(hashint4(g % {issues})) + g / {issues}) % {labels}), 'i' || (1 + g % {issues})
  FROM generate_series(0, {issue_labels} - 1) g
  ON CONFLICT DO NOTHING;
ANALYZE;
"#,
        users = s.users,
        labels = s.labels,
        issues = s.issues,
        comments = s.comments,
        issue_labels = s.issue_labels,
    )
}
