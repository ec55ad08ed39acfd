import type { Digest } from '../digest.js'

/** Most digests remembered; the oldest are forgotten first. */
const MAX_DIGESTS = 20_000
/** Most repositories remembered per digest. */
const MAX_REPOSITORIES = 16

const known = new Map<Digest, string[]>()

/**
 * Remembers that `registry/repository` holds the blob `digest`, so that a later push of the
 * same blob to another repository of that registry can mount it instead of uploading it.
 * Process-wide, in memory, bounded.
 */
export function recordBlobLocation(digest: Digest, registry: string, repository: string): void {
  const key = `${registry}/${repository}`
  const list = known.get(digest) ?? []
  const i = list.indexOf(key)
  if (i !== -1) list.splice(i, 1)
  list.unshift(key)
  if (list.length > MAX_REPOSITORIES) list.length = MAX_REPOSITORIES
  known.delete(digest)
  known.set(digest, list)
  if (known.size > MAX_DIGESTS) known.delete(known.keys().next().value as Digest)
}

/** Repositories of `registry` other than `except` known to hold `digest`, most recent first. */
export function blobLocations(digest: Digest, registry: string, except?: string): string[] {
  const prefix = `${registry}/`
  return (known.get(digest) ?? [])
    .filter((key) => key.startsWith(prefix))
    .map((key) => key.slice(prefix.length))
    .filter((repository) => repository !== except)
}

/** Forgets every remembered location (for tests). */
export function clearBlobLocations(): void {
  known.clear()
}
