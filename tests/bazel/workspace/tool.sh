#!/bin/sh
wc -l "$1"
head -c 64 /dev/urandom | od -An -tx1
