#!/bin/bash
# One test suite inside the guest: suite.sh NAME EXECUTABLE SECONDS. NAME.started marks its
# start (the host times the suite by its own clock), its output goes to /mnt/NAME.log, then
# "EXIT-CODE SECONDS" to /mnt/NAME.status, which the host waits for.
name=$1 exe=$2 limit=$3
: >"/mnt/$name.started"
start=$(date +%s)
timeout -k 10 "$limit" "$exe" --test-threads=1 >"/mnt/$name.log" 2>&1
rc=$?
echo "$rc $(($(date +%s) - start))" >"/mnt/$name.status"
