// node-postgres (`pg`) scenarios (issue 14): `node pg_scenarios.js DSN [scenario...]`.
//
// Prints one JSON line per scenario: {name, ok, detail}. Each scenario
// returns its observed values (compared between a run through the node and
// a run directly on PostgreSQL) and checks exact values with `eq`; one that
// throws is reported `ok: false` and the script goes on. Tables are named
// drvn_*; `drv_kv` is the table the tests shard by `id`.
'use strict'

const assert = require('node:assert')
const pg = require('pg')

const DSN = process.argv[2]
const ONLY = new Set(process.argv.slice(3))

class Fail extends Error {}

function eq(what, got, want) {
  try {
    assert.deepStrictEqual(got, want)
  } catch (e) {
    throw new Fail(`${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`)
  }
}

function describe(e) {
  return e.code ? `${e.code}: ${e.message}` : `${e.name}: ${e.message}`
}

async function connect(extra = {}) {
  const c = new pg.Client({ connectionString: DSN, connectionTimeoutMillis: 10000, ...extra })
  await c.connect()
  return c
}

async function withClient(extra, fn) {
  const c = await connect(extra)
  try {
    return await fn(c)
  } finally {
    await c.end()
  }
}

async function types() {
  return withClient({}, async (c) => {
    const ts = new Date(Date.UTC(2024, 1, 29, 12, 34, 56, 789))
    const values = [42, '1099511627776', "héllo ✓ 'quoted' \\ \"x\"", '12345.678901', ts,
      Buffer.from([0, 1, 255, 98, 105, 110]), { a: [1, 2, { b: null }], é: 'ü' },
      [1, 2, null, 4], ['x', 'y z', null], null, true, 1.5]
    const types = ['int4', 'int8', 'text', 'numeric', 'timestamptz', 'bytea', 'jsonb',
      'int4[]', 'text[]', 'int4', 'bool', 'float8']
    const sql = 'SELECT ' + types.map((t, i) => `$${i + 1}::${t} AS c${i}`).join(', ')
    const r = await c.query(sql, values)
    eq('row count', r.rowCount, 1)
    const got = types.map((_, i) => r.rows[0][`c${i}`])
    eq('round trip', got, values)
    // Fields: names and type OIDs as PostgreSQL sends them.
    return r.fields.map((f) => `${f.name}:${f.dataTypeID}`).join(',')
  })
}

async function transactions() {
  return withClient({}, async (c) => {
    await c.query('DROP TABLE IF EXISTS drvn_tx; CREATE TABLE drvn_tx (id int PRIMARY KEY)')
    await c.query('BEGIN')
    await c.query('INSERT INTO drvn_tx VALUES ($1)', [1])
    await c.query('COMMIT')
    await c.query('BEGIN')
    await c.query('INSERT INTO drvn_tx VALUES ($1)', [2])
    await c.query('ROLLBACK')
    await c.query('BEGIN')
    await c.query('INSERT INTO drvn_tx VALUES ($1)', [3])
    await c.query('SAVEPOINT s')
    let dup
    try {
      await c.query('INSERT INTO drvn_tx VALUES ($1)', [3])
    } catch (e) {
      dup = describe(e)
    }
    await c.query('ROLLBACK TO SAVEPOINT s')
    await c.query('COMMIT')
    const ids = (await c.query('SELECT id FROM drvn_tx ORDER BY id')).rows.map((r) => r.id)
    eq('committed rows', ids, [1, 3])
    eq('duplicate', dup, '23505: duplicate key value violates unique constraint "drvn_tx_pkey"')
    return `rows ${JSON.stringify(ids)}; ${dup}`
  })
}

async function pipelineError() {
  // pg's pipeline mode: queries are sent without waiting; an error skips
  // the rest of its batch as PostgreSQL does.
  return withClient({ pipeline: true }, async (c) => {
    const qs = ['SELECT 1 AS a', 'SELECT * FROM doesnotexist', "SELECT 'after' AS a", 'SELECT 2 AS a']
    const settled = await Promise.allSettled(qs.map((q) => c.query(q)))
    const out = settled.map((s) => (s.status === 'fulfilled' ? JSON.stringify(s.value.rows) : describe(s.reason)))
    const after = (await c.query('SELECT 3 AS a')).rows
    eq('usable after', after, [{ a: 3 }])
    // pg sends a Sync after each query: the error ends only its own.
    eq('outcomes', out, ['[{"a":1}]', '42P01: relation "doesnotexist" does not exist', '[{"a":"after"}]', '[{"a":2}]'])
    return out
  })
}

async function preparedAfterAlter() {
  // Named queries: pg prepares once per connection and reuses the name.
  return withClient({}, async (c) => {
    await c.query('DROP TABLE IF EXISTS drvn_prep; CREATE TABLE drvn_prep (a int)')
    await c.query('INSERT INTO drvn_prep VALUES (1)')
    const step = async () => {
      try {
        return JSON.stringify((await c.query({ name: 'sel', text: 'SELECT * FROM drvn_prep WHERE a = $1', values: [1] })).rows)
      } catch (e) {
        return describe(e)
      }
    }
    const out = [await step(), await step()]
    await c.query("ALTER TABLE drvn_prep ADD COLUMN b text DEFAULT 'x'")
    out.push(await step(), await step())
    await c.query('ALTER TABLE drvn_prep ALTER COLUMN a TYPE bigint')
    out.push(await step(), await step())
    // What PostgreSQL 15 answers directly (pg does not re-prepare).
    const changed = '0A000: cached plan must not change result type'
    eq('outcomes', out, ['[{"a":1}]', '[{"a":1}]', changed, changed, changed, changed])
    return out
  })
}

async function multiStatementString() {
  // A migration-style query string: DDL (every shard) and a write to an
  // unsharded table (its home shard) in one simple Query.
  return withClient({}, async (c) => {
    const r = await c.query('DROP TABLE IF EXISTS drvn_multi; CREATE TABLE drvn_multi (a int); INSERT INTO drvn_multi VALUES (1), (2)')
    eq('results', r.map((x) => x.command), ['DROP', 'CREATE', 'INSERT'])
    eq('rows', (await c.query('SELECT a FROM drvn_multi ORDER BY a')).rows, [{ a: 1 }, { a: 2 }])
    return r.map((x) => `${x.command} ${x.rowCount}`)
  })
}

async function listenNotify() {
  const lis = await connect()
  const other = await connect()
  try {
    const got = []
    let wake
    lis.on('notification', (n) => {
      got.push([n.channel, n.payload])
      if (wake) wake()
    })
    await lis.query('LISTEN drv_ch')
    await other.query("NOTIFY drv_ch, 'hello'")
    await other.query("SELECT pg_notify('drv_ch', $1)", ['from pg_notify'])
    await other.query('BEGIN')
    await other.query("NOTIFY drv_ch, 'in a transaction'")
    await other.query('COMMIT')
    const deadline = Date.now() + 10000
    while (got.length < 3 && Date.now() < deadline) {
      await new Promise((resolve) => {
        wake = resolve
        setTimeout(resolve, 100)
      })
    }
    eq('notifications', got, [['drv_ch', 'hello'], ['drv_ch', 'from pg_notify'], ['drv_ch', 'in a transaction']])
    return got.map((g) => g[1])
  } finally {
    await lis.end()
    await other.end()
  }
}

async function clientEncoding() {
  const c = new pg.Client({ connectionString: DSN, connectionTimeoutMillis: 10000, client_encoding: 'utf-8' })
  const status = {}
  c.connection.on('parameterStatus', (m) => {
    status[m.parameterName] = m.parameterValue
  })
  await c.connect()
  try {
    const shown = (await c.query('SHOW client_encoding')).rows[0].client_encoding
    const text = (await c.query('SELECT $1::text AS t', ['żółw €'])).rows[0].t
    eq('ParameterStatus client_encoding', status.client_encoding, 'UTF8')
    eq('SHOW client_encoding', shown, 'UTF8')
    eq('text', text, 'żółw €')
    return [status.client_encoding, shown]
  } finally {
    await c.end()
  }
}

async function cancel() {
  return withClient({}, async (c) => {
    const q = new pg.Query('SELECT pg_sleep(30)')
    const start = Date.now()
    const done = new Promise((resolve) => {
      q.on('error', (e) => resolve(describe(e)))
      q.on('end', () => resolve('not cancelled'))
    })
    c.query(q)
    // A cancel sent before the query reaches the server is lost (as
    // directly): send again until the query ends, bounded.
    let finished = false
    done.then(() => {
      finished = true
    })
    while (!finished && Date.now() - start < 10000) {
      await new Promise((r) => setTimeout(r, 200))
      if (!finished) new pg.Client({ connectionString: DSN }).cancel(c, q)
    }
    const err = await done
    eq('error', err, '57014: canceling statement due to user request')
    eq('usable after', (await c.query('SELECT 1 AS a')).rows, [{ a: 1 }])
    return err
  })
}

async function shardedKeys() {
  return withClient({}, async (c) => {
    await c.query('DROP TABLE IF EXISTS drv_kv')
    await c.query('CREATE TABLE drv_kv (id bigint PRIMARY KEY, v text)')
    for (let i = 1; i <= 20; i++) {
      await c.query('INSERT INTO drv_kv (id, v) VALUES ($1, $2)', [i, `v${i}`])
    }
    for (let i = 1; i <= 20; i++) {
      eq(`read ${i}`, (await c.query('SELECT v FROM drv_kv WHERE id = $1', [i])).rows, [{ v: `v${i}` }])
    }
    await c.query('BEGIN')
    await c.query("UPDATE drv_kv SET v = v || '+' WHERE id = $1", [5])
    await c.query('COMMIT')
    await c.query('DELETE FROM drv_kv WHERE id = $1', [20])
    const rows = (await c.query('SELECT id, v FROM drv_kv ORDER BY id')).rows
    const want = []
    for (let i = 1; i <= 19; i++) want.push({ id: String(i), v: i === 5 ? 'v5+' : `v${i}` })
    eq('rows', rows, want)
    return 'ids 1..19, 5 updated'
  })
}

async function havingParams() {
  // GROUP BY … HAVING an aggregate compared with a parameter, as
  // node-postgres sends every parameter: text, of no type (Knex, Sequelize
  // build such queries). PostgreSQL reads it as the aggregate's type.
  return withClient({}, async (c) => {
    await c.query('DROP TABLE IF EXISTS drv_kv')
    await c.query('CREATE TABLE drv_kv (id bigint PRIMARY KEY, v text, g int4)')
    for (let i = 1; i <= 30; i++) {
      await c.query('INSERT INTO drv_kv (id, v, g) VALUES ($1, $2, $3)', [i, `v${i}`, i % 4])
    }
    const out = {}
    const q = async (name, sql, params) => {
      out[name] = (await c.query(sql, params)).rows
    }
    await q('count', 'SELECT g, count(*) AS n FROM drv_kv GROUP BY g HAVING count(*) > $1 ORDER BY g', [7])
    await q('sum', 'SELECT g, sum(id) AS s FROM drv_kv GROUP BY g HAVING sum(id) >= $1 ORDER BY g', ['120'])
    await q('avg', 'SELECT g FROM drv_kv GROUP BY g HAVING avg(id) > $1 ORDER BY g', [15.5])
    await q('max', 'SELECT g FROM drv_kv GROUP BY g HAVING max(g) < $1 AND count(*) <> $2 ORDER BY g', [3, ' 8 '])
    eq('count', out.count, [{ g: 1, n: '8' }, { g: 2, n: '8' }])
    return out
  })
}

async function subqueriesFirst() {
  // Subqueries that need every shard's rows, run first by the node: an
  // average compared with (a parameter beside it), a count over DISTINCT
  // of another column, IN (… LIMIT n) — node-postgres Parses each unnamed
  // in the batch that binds it (drv_kv, sharded by id).
  return withClient({}, async (c) => {
    await c.query('DROP TABLE IF EXISTS drv_kv')
    await c.query('CREATE TABLE drv_kv (id bigint PRIMARY KEY, v text, g int4)')
    const values = []
    for (let i = 1; i <= 60; i++) values.push(`(${i}, 'v${i}', ${i % 7})`)
    await c.query(`INSERT INTO drv_kv (id, v, g) VALUES ${values.join(', ')}`)
    const above = (await c.query('SELECT count(*) AS n FROM drv_kv WHERE id > (SELECT avg(id) FROM drv_kv) AND g <> $1', [0])).rows
    const groups = (await c.query('SELECT count(*) AS n FROM (SELECT DISTINCT g FROM drv_kv) s')).rows
    const top = (await c.query('SELECT id FROM drv_kv WHERE id IN (SELECT id FROM drv_kv ORDER BY v DESC LIMIT 3) ORDER BY id')).rows
    eq('above', above, [{ n: '26' }])
    eq('groups', groups, [{ n: '7' }])
    eq('top', top, [{ id: '7' }, { id: '8' }, { id: '9' }])
    return { above, groups, top }
  })
}

async function queryStream() {
  // pg-query-stream (pg-cursor: a named portal read n rows at a time with
  // Flush) — what Knex's and TypeORM's .stream() use — over the sharded
  // table, outside a transaction block and inside one, ordered and not;
  // then the connection goes on.
  const QueryStream = require('pg-query-stream')
  return withClient({}, async (c) => {
    await c.query('DROP TABLE IF EXISTS drv_kv')
    await c.query('CREATE TABLE drv_kv (id bigint PRIMARY KEY, v text)')
    for (let i = 1; i <= 40; i++) {
      await c.query('INSERT INTO drv_kv (id, v) VALUES ($1, $2)', [i, `v${i}`])
    }
    const stream = async (sql, params) => {
      const ids = []
      for await (const r of c.query(new QueryStream(sql, params, { batchSize: 7 }))) ids.push(Number(r.id))
      return ids
    }
    const out = {}
    out.ordered = await stream('SELECT id FROM drv_kv WHERE id > $1 ORDER BY id DESC', [3])
    eq('ordered', out.ordered, Array.from({ length: 37 }, (_, i) => 40 - i))
    out.unordered = (await stream('SELECT id FROM drv_kv', [])).sort((a, b) => a - b)
    eq('unordered', out.unordered, Array.from({ length: 40 }, (_, i) => i + 1))
    await c.query('BEGIN')
    out.in_block = await stream('SELECT id FROM drv_kv WHERE id <= $1 ORDER BY id', [12])
    await c.query('COMMIT')
    out.after = (await c.query('SELECT count(*) AS n FROM drv_kv')).rows[0].n
    return out
  })
}

async function sequelizeOrm() {
  // Sequelize 6 over pg, on a table named as Sequelize names it by default
  // (model DrvSqUser: table "DrvSqUsers", mixed case, a SERIAL key the
  // tests shard by, an ENUM column whose type sync() creates in a DO
  // block): sync, create, bulkCreate returning the keys, findByPk, findAll
  // with where/order/limit, count, increment, upsert (ON CONFLICT ("id") DO
  // UPDATE SET "id"=EXCLUDED."id", …), a REPEATABLE READ managed
  // transaction over both shards, a nested transaction (a savepoint) whose
  // unique violation is rolled back while the outer one commits,
  // bulkCreate with updateOnDuplicate, findOrCreate (its temporary
  // function inserting the row), destroy, a raw query. Keys and values as
  // PostgreSQL's.
  const { Sequelize, DataTypes, Op, QueryTypes, Transaction } = require('sequelize')
  const sq = new Sequelize(DSN, {
    dialect: 'postgres',
    logging: false,
    pool: { max: 2 },
    dialectOptions: { connectionTimeoutMillis: 10000 },
  })
  const User = sq.define('DrvSqUser', {
    name: DataTypes.STRING,
    n: { type: DataTypes.INTEGER, defaultValue: 0 },
    role: { type: DataTypes.ENUM('admin', 'member'), defaultValue: 'member' },
  })
  const plain = (u) => [u.id, u.name, u.n, u.role]
  const out = {}
  try {
    await User.sync({ force: true })
    const first = await User.create({ name: 'u1', n: 1, role: 'admin' })
    out.create = first.id
    const bulk = await User.bulkCreate(
      [2, 3, 4, 5, 6, 7, 8, 9].map((i) => ({ name: `u${i}`, n: i })),
      { returning: true }
    )
    out.bulkCreate = bulk.map((u) => u.id)
    eq('bulkCreate ids', out.bulkCreate, [2, 3, 4, 5, 6, 7, 8, 9])
    out.findByPk = plain(await User.findByPk(5))
    out.findAll = (await User.findAll({ where: { n: { [Op.gte]: 4 } }, order: [['n', 'DESC']], limit: 3 })).map(plain)
    out.count = await User.count({ where: { role: 'member' } })
    await User.increment('n', { by: 10, where: { id: [1, 2, 3] } })
    await first.increment('n', { by: 100 })
    out.increment = (await User.findAll({ where: { id: [1, 2, 3] }, order: [['id', 'ASC']] })).map(plain)
    const [up, upCreated] = await User.upsert({ id: 4, name: 'up4', n: 40 })
    const [fresh, freshCreated] = await User.upsert({ id: 100, name: 'up100', n: 1 })
    out.upsert = [plain(up), upCreated, plain(fresh), freshCreated]
    // bulkCreate's own upsert: ON CONFLICT ("id") DO UPDATE SET "name"=EXCLUDED."name", …
    const dup = await User.bulkCreate(
      [{ id: 6, name: 'dup6', n: 60 }, { id: 7, name: 'dup7', n: 70 }],
      { updateOnDuplicate: ['name', 'n'] }
    )
    out.updateOnDuplicate = dup.map(plain)
    // findOrCreate: a temporary function whose body inserts the row, run
    // on the shard owning the row's key (filled first from the sequence).
    const [made, madeCreated] = await User.findOrCreate({ where: { name: 'foc' }, defaults: { n: 3 } })
    const [found, foundCreated] = await User.findOrCreate({ where: { name: 'foc' }, defaults: { n: 4 } })
    out.findOrCreate = [plain(made), madeCreated, plain(found), foundCreated]

    // Rows on both shards in one REPEATABLE READ transaction.
    out.repeatableRead = await sq.transaction(
      { isolationLevel: Transaction.ISOLATION_LEVELS.REPEATABLE_READ },
      async (t) => {
        const [level] = await sq.query('SHOW transaction_isolation', { type: QueryTypes.SELECT, transaction: t })
        await User.update({ n: sq.literal('"n" + 1') }, { where: { id: { [Op.between]: [5, 9] } }, transaction: t })
        const made = await User.create({ name: 'rr' }, { transaction: t })
        const sum = await User.sum('n', { where: { id: { [Op.between]: [5, 9] } }, transaction: t })
        return [level.transaction_isolation, made.id, sum]
      }
    )

    // A nested transaction is a savepoint: its rows (on both shards) are
    // undone by the unique violation, the outer transaction commits.
    out.nested = await sq.transaction(async (outer) => {
      const o = await User.create({ name: 'outer' }, { transaction: outer })
      let err
      try {
        await sq.transaction({ transaction: outer }, async (inner) => {
          await User.bulkCreate([0, 1, 2, 3].map((i) => ({ name: `inner${i}` })), { transaction: inner })
          await User.create({ id: 2, name: 'dup' }, { transaction: inner })
        })
      } catch (e) {
        err = `${e.name} ${e.parent && e.parent.code}`
      }
      const a = await User.create({ name: 'after' }, { transaction: outer })
      return [o.id, err, a.id]
    })
    eq('inner rows undone', await User.count({ where: { name: { [Op.like]: 'inner%' } } }), 0)

    out.destroy = await User.destroy({ where: { name: { [Op.in]: ['u8', 'foc'] } } })
    const [raw] = await sq.query('SELECT count(*)::int AS n FROM "DrvSqUsers"', { type: QueryTypes.SELECT })
    out.raw = raw
    out.all = (await User.findAll({ order: [['id', 'ASC']] })).map(plain)
  } finally {
    await sq.close()
  }
  return out
}

const SCENARIOS = [
  ['types', types],
  ['transactions', transactions],
  ['pipeline_error', pipelineError],
  ['prepared_after_alter', preparedAfterAlter],
  ['multi_statement_string', multiStatementString],
  ['listen_notify', listenNotify],
  ['client_encoding', clientEncoding],
  ['cancel', cancel],
  ['sharded_keys', shardedKeys],
  ['sequelize_orm', sequelizeOrm],
  ['having_params', havingParams],
  ['query_stream', queryStream],
  ['subqueries_first', subqueriesFirst],
]

async function main() {
  for (const [name, fn] of SCENARIOS) {
    if (ONLY.size && !ONLY.has(name)) continue
    const start = Date.now()
    let line
    try {
      line = { name, ok: true, detail: await fn() }
    } catch (e) {
      line = { name, ok: false, detail: e instanceof Fail ? e.message : `${describe(e)} | ${(e.stack || '').split('\n').slice(1, 3).join(' ')}` }
    }
    process.stdout.write(JSON.stringify(line) + '\n')
    process.stderr.write(`${name}: ${((Date.now() - start) / 1000).toFixed(2)}s\n`)
  }
}

main().then(
  () => process.exit(0),
  (e) => {
    process.stderr.write(`driver script failed: ${e.stack}\n`)
    process.exit(2)
  }
)
