// Vitest global setup: prepares the record that test/helpers/peers.ts appends to, and on
// teardown (the end of the run) prints one line saying which peer tools were present and which
// suites were skipped because one was missing.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { PEER_RECORD_ENV, PEER_TOOLS, peersRequired, which } from './peers.js'

interface PeerRecord {
  name: string
  found: string | null
  suite: string
}

/** Sets up the peer-tool record; returns the teardown that reports on it. */
export default function setup(): () => void {
  const dir = mkdtempSync(join(tmpdir(), 'blobcache-peers-'))
  const file = join(dir, 'record.jsonl')
  // Workers are started after global setup, and inherit this environment.
  process.env[PEER_RECORD_ENV] = file

  return () => {
    try {
      for (const line of peerReport(readRecords(file))) console.log(line)
    } finally {
      rmSync(dir, { recursive: true, force: true })
      delete process.env[PEER_RECORD_ENV]
    }
  }
}

function readRecords(file: string): PeerRecord[] {
  let text: string
  try {
    text = readFileSync(file, 'utf8')
  } catch {
    return []
  }
  const records: PeerRecord[] = []
  for (const line of text.split('\n')) {
    if (!line.trim()) continue
    try {
      records.push(JSON.parse(line) as PeerRecord)
    } catch {
      // a torn line from a worker killed mid-write; ignore it
    }
  }
  return records
}

/** The closing lines: tools missing and the suites that skipped (or failed) for it. */
function peerReport(records: PeerRecord[]): string[] {
  const names = [...new Set<string>([...PEER_TOOLS, ...records.map((r) => r.name)])]
  const missing = names.filter(
    (n) => which(n) === undefined || records.some((r) => r.name === n && r.found === null),
  )
  if (missing.length === 0) return [`all peer tools present: ${names.join(', ')}`]
  const suites = [...new Set(records.filter((r) => r.found === null && r.suite).map((r) => r.suite))].sort()
  const verb = peersRequired() ? 'suites failed (BLOBCACHE_REQUIRE_PEERS=1)' : 'suites skipped'
  const lines = [`peer tools missing, ${verb}: ${missing.join(', ')}`]
  for (const suite of suites) lines.push(`  ${suite}`)
  return lines
}
