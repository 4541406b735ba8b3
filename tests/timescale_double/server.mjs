// TimescaleDB dialect double: PGlite (WASM PostgreSQL 17) with the TimescaleDB
// extension, served over the PostgreSQL wire protocol on 127.0.0.1.
//
// Why: TimescaleDB's SQL (hypertables, continuous aggregates, compression)
// cannot run on Debian's PostgreSQL, and the network only reaches package
// registries.  This is a *test double* for the dialect's DDL and refresh SQL,
// not a database to trust: unverified provenance, pinned exactly in
// package.json / package-lock.json.
//
// Usage: node server.mjs [PORT] [DATA_DIR]
//   PORT      TCP port on 127.0.0.1; 0 (default) picks a free one.
//   DATA_DIR  optional directory to persist data in (also env
//             TIMESCALE_DOUBLE_DATA_DIR); default: in memory.
// Prints exactly one line "READY <port>" on stdout once listening, so a parent
// process can learn the port; everything else goes to stderr.  Exits 0 on
// SIGTERM / SIGINT, and on EOF of stdin when TIMESCALE_DOUBLE_EXIT_ON_STDIN_EOF=1.
//
// Limits clients must respect: ONE PostgreSQL session is shared by all
// connections (use psycopg prepare_threshold=None; SET and temp tables leak
// between connections; while one connection has a transaction open the others
// wait), no COPY FROM STDIN (rejected with SQLSTATE 0A000), no background
// workers (call run_job), any password is accepted but one must be sent.

import { PGlite } from '@electric-sql/pglite'
import { timescaledb } from '@electric-sql/pglite/timescaledb'
import { PGLiteSocketHandler, PGLiteSocketServer } from '@electric-sql/pglite-socket'

const HOST = '127.0.0.1'
const MAX_CONNECTIONS = 64
// How long a connection may wait for the shared session before it is closed
// (turns a cross-connection deadlock in a test into a prompt failure).
const SESSION_WAIT_MS = Number(process.env.TIMESCALE_DOUBLE_SESSION_WAIT_MS || 60000)

// Pre-startup request codes (PostgreSQL protocol, "Message Formats").
const SSL_REQUEST_CODE = 80877103
const GSSENC_REQUEST_CODE = 80877104
const CANCEL_REQUEST_CODE = 80877102

const SYNC_MESSAGE = new Uint8Array([0x53, 0, 0, 0, 4]) // 'S'
const COPY_FROM_STDIN = /\bCOPY\b[\s\S]*?\bFROM\s+STDIN\b/i
const COPY_REJECTION =
  "DO $copy_rejected$ BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', " +
  "MESSAGE = 'COPY FROM STDIN is not supported by the TimescaleDB test double', " +
  "HINT = 'PGlite aborts its WASM instance on COPY FROM STDIN, which would break " +
  "every later test; use a multi-row INSERT'; END $copy_rejected$"

const utf8 = new TextDecoder()
const utf8Encoder = new TextEncoder()

function log(...args) {
  console.error('[timescale-double]', ...args)
}

function parsePort(raw) {
  if (raw === undefined || raw === '') return 0
  const port = Number(raw)
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`invalid port ${JSON.stringify(raw)}`)
  }
  return port
}

function cstringEnd(bytes, start) {
  const end = bytes.indexOf(0, start)
  if (end < 0) throw new Error('malformed message: unterminated string')
  return end
}

function frame(type, body) {
  const out = new Uint8Array(5 + body.length)
  out[0] = type
  new DataView(out.buffer).setInt32(1, 4 + body.length)
  out.set(body, 5)
  return out
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0))
  let at = 0
  for (const p of parts) {
    out.set(p, at)
    at += p.length
  }
  return out
}

function simpleQuery(sql) {
  return frame(0x51, concat(utf8Encoder.encode(sql), new Uint8Array([0]))) // 'Q'
}

// COPY FROM STDIN makes PGlite 0.3.14 hit a WASM "unreachable" trap: the
// connection drops and every later statement, on any connection, fails.  Swap
// such a statement for one that raises a clear error inside PostgreSQL, so the
// error and the transaction state are PostgreSQL's own.
function rejectCopyFromStdin(message) {
  const type = String.fromCharCode(message[0])
  if (type === 'Q') {
    const sql = utf8.decode(message.subarray(5, cstringEnd(message, 5)))
    return COPY_FROM_STDIN.test(sql) ? simpleQuery(COPY_REJECTION) : message
  }
  if (type === 'P') {
    const nameEnd = cstringEnd(message, 5)
    const sqlEnd = cstringEnd(message, nameEnd + 1)
    const sql = utf8.decode(message.subarray(nameEnd + 1, sqlEnd))
    if (!COPY_FROM_STDIN.test(sql)) return message
    const body = concat(
      message.subarray(5, nameEnd + 1),
      utf8Encoder.encode(COPY_REJECTION),
      new Uint8Array([0, 0, 0]), // terminator + zero parameter types
    )
    return frame(0x50, body)
  }
  return message
}

// Transaction status of the last ReadyForQuery in a backend response, or null
// when the response has none (the client is mid-way through a message flow).
function lastReadyStatus(response) {
  let status = null
  let at = 0
  const view = new DataView(response.buffer, response.byteOffset, response.byteLength)
  while (at + 5 <= response.length) {
    const type = response[at]
    const length = view.getInt32(at + 1)
    if (type === 0x5a && length === 5 && at + 5 < response.length + 0) {
      status = String.fromCharCode(response[at + 5])
    }
    at += 1 + length
  }
  return status
}

// Replaces pglite-socket 0.0.22's QueryQueueManager (same duck-typed API).
// The upstream queue keeps one connection on the session only while
// db.isInTransaction(); between the Parse and Sync of an extended-protocol
// query (what psycopg sends) it interleaves other connections' messages, so
// concurrent clients overwrite each other's unnamed statement and hang.  Here
// a connection owns the session from its first message until the backend is
// idle again (ReadyForQuery 'I'); others wait.  Each result is also copied:
// PGlite's execProtocolRaw returns a view into one reused buffer, which
// upstream copies only after the next message may have run, so interleaved
// connections received each other's bytes.
class SessionArbiter {
  constructor(db) {
    this.db = db
    this.jobs = []
    this.owner = null
    this.running = false
    this.sweeper = setInterval(() => this.expireWaiters(), 1000)
    this.sweeper.unref()
  }

  enqueue(handlerId, message) {
    return new Promise((resolve, reject) => {
      this.jobs.push({ handlerId, message, resolve, reject, since: Date.now() })
      this.pump()
    })
  }

  getQueueLength() {
    return this.jobs.length
  }

  clearQueueForHandler(handlerId) {
    this.jobs = this.jobs.filter((job) => {
      if (job.handlerId !== handlerId || job.reset) return true
      job.reject(new Error('Handler disconnected'))
      return false
    })
  }

  // Called on every disconnect: if the leaving connection held the session
  // mid-flow or in a transaction, end the flow and roll back before anyone
  // else gets it.
  clearTransactionIfNeeded(handlerId) {
    if (this.owner !== handlerId) return Promise.resolve()
    return new Promise((resolve) => {
      this.jobs.unshift({ handlerId, reset: true, resolve, reject: resolve, since: Date.now() })
      this.pump()
    })
  }

  expireWaiters() {
    const now = Date.now()
    this.jobs = this.jobs.filter((job) => {
      if (job.reset || job.handlerId === this.owner || now - job.since < SESSION_WAIT_MS) return true
      log(
        `connection #${job.handlerId} waited ${SESSION_WAIT_MS} ms for the shared session, ` +
          `held by connection #${this.owner} (open transaction on another connection?); closing it`,
      )
      job.reject(new Error('timed out waiting for the shared session'))
      return false
    })
  }

  nextJob() {
    const index =
      this.owner === null ? 0 : this.jobs.findIndex((job) => job.handlerId === this.owner)
    return index < 0 || index >= this.jobs.length ? null : this.jobs.splice(index, 1)[0]
  }

  async pump() {
    if (this.running) return
    this.running = true
    try {
      for (let job = this.nextJob(); job; job = this.nextJob()) {
        if (job.reset) {
          await this.reset(job.handlerId)
          job.resolve()
          continue
        }
        try {
          job.resolve(await this.run(job.handlerId, job.message))
        } catch (err) {
          log(`message from connection #${job.handlerId} failed:`, err)
          job.reject(err)
        }
      }
    } finally {
      this.running = false
    }
  }

  async run(handlerId, message) {
    if (message[0] === 0x58) {
      // Terminate ('X'): the session outlives the connection; just let go.
      await this.reset(handlerId)
      return new Uint8Array(0)
    }
    const response = await this.db.runExclusive(async () =>
      (await this.db.execProtocolRaw(rejectCopyFromStdin(message))).slice(),
    )
    const status = lastReadyStatus(response)
    this.owner = status === 'I' ? null : handlerId
    return response
  }

  async reset(handlerId) {
    if (this.owner !== handlerId) return
    try {
      await this.db.runExclusive(async () => {
        let status = lastReadyStatus(await this.db.execProtocolRaw(SYNC_MESSAGE))
        if (status !== 'I' || this.db.isInTransaction()) {
          status = lastReadyStatus(await this.db.execProtocolRaw(simpleQuery('ROLLBACK')))
        }
        if (status !== 'I') log(`session not idle after resetting connection #${handlerId}: ${status}`)
      })
    } catch (err) {
      log(`resetting the session after connection #${handlerId} failed:`, err)
    }
    this.owner = null
  }
}

// pglite-socket 0.0.22 does not answer SSLRequest / GSSENCRequest: it reads
// the 8-byte request as the start of a normal message and waits forever, so a
// libpq client with the default sslmode=prefer hangs.  Answer 'N' (no
// encryption) like a server built without SSL, and close on CancelRequest
// (one shared session: cancelling is not supported).
function patchPreStartupRequests() {
  const original = PGLiteSocketHandler.prototype.handleData
  PGLiteSocketHandler.prototype.handleData = async function (data) {
    if (this.socket && this.messageBuffer.length === 0 && data.length >= 8) {
      const length = data.readInt32BE(0)
      const code = data.readInt32BE(4)
      if (length === 8 && (code === SSL_REQUEST_CODE || code === GSSENC_REQUEST_CODE)) {
        this.socket.write(Buffer.from('N'))
        return data.length === 8 ? 0 : original.call(this, data.subarray(8))
      }
      if (length === 16 && code === CANCEL_REQUEST_CODE) {
        this.socket.end()
        return 0
      }
    }
    return original.call(this, data)
  }
}

async function main() {
  const port = parsePort(process.argv[2])
  const dataDir = process.argv[3] || process.env.TIMESCALE_DOUBLE_DATA_DIR || 'memory://'

  const started = Date.now()
  const db = await PGlite.create({ dataDir, extensions: { timescaledb } })
  patchPreStartupRequests()

  const server = new PGLiteSocketServer({
    db,
    host: HOST,
    port,
    // The library's default is 1 connection; pools and fixtures open more.
    maxConnections: MAX_CONNECTIONS,
  })
  if (!server.queryQueue) throw new Error('pglite-socket changed: no queryQueue to replace')
  server.queryQueue = new SessionArbiter(db)
  server.addEventListener('error', (event) => log('server error:', event.detail))

  let stopping = false
  const shutdown = async (reason) => {
    if (stopping) return
    stopping = true
    log(`${reason}: stopping`)
    const force = setTimeout(() => {
      log('shutdown timed out; exiting')
      process.exit(1)
    }, 5000)
    force.unref()
    try {
      await server.stop()
      await db.close()
    } catch (err) {
      log('error during shutdown:', err)
    }
    process.exit(0)
  }
  process.on('SIGTERM', () => void shutdown('SIGTERM'))
  process.on('SIGINT', () => void shutdown('SIGINT'))
  if (process.env.TIMESCALE_DOUBLE_EXIT_ON_STDIN_EOF === '1') {
    // Opt-in: a parent that holds our stdin pipe open and dies without
    // signalling (e.g. a SIGKILLed pytest) must not leave an orphan server.
    process.stdin.on('end', () => void shutdown('stdin closed'))
    process.stdin.on('error', () => {})
    process.stdin.resume()
  }

  await server.start()
  const actualPort = Number(server.getServerConn().split(':').pop())
  log(`listening on ${HOST}:${actualPort} (data: ${dataDir}, startup ${Date.now() - started} ms)`)
  process.stdout.write(`READY ${actualPort}\n`)
}

main().catch((err) => {
  log('failed to start:', err?.stack ?? err)
  process.exit(1)
})
